import Glibc
import InterruptControllers
import VMCore

// Model-specific registers (Intel SDM vol. 4): the set Linux touches during boot. Unknown MSRs
// raise #GP(0), which Linux's rdmsr_safe/wrmsr_safe probes expect.

/// MSR numbers.
public enum MSRIndex {
  public static let tsc: UInt32 = 0x10
  public static let platformID: UInt32 = 0x17
  public static let apicBase: UInt32 = 0x1B
  public static let featureControl: UInt32 = 0x3A
  public static let tscAdjust: UInt32 = 0x3B
  public static let biosSignID: UInt32 = 0x8B
  public static let platformInfo: UInt32 = 0xCE
  public static let mtrrCapabilities: UInt32 = 0xFE
  public static let sysenterCS: UInt32 = 0x174
  public static let sysenterESP: UInt32 = 0x175
  public static let sysenterEIP: UInt32 = 0x176
  public static let mcgCapabilities: UInt32 = 0x179
  public static let mcgStatus: UInt32 = 0x17A
  public static let miscEnable: UInt32 = 0x1A0
  public static let mtrrPhysBase0: UInt32 = 0x200
  public static let mtrrFixed64K: UInt32 = 0x250
  public static let mtrrFixed16K80000: UInt32 = 0x258
  public static let mtrrFixed16KA0000: UInt32 = 0x259
  public static let mtrrFixed4KC0000: UInt32 = 0x268
  public static let pat: UInt32 = 0x277
  public static let mtrrDefaultType: UInt32 = 0x2FF
  public static let tscDeadline: UInt32 = 0x6E0
  public static let efer: UInt32 = 0xC000_0080
  public static let star: UInt32 = 0xC000_0081
  public static let lstar: UInt32 = 0xC000_0082
  public static let cstar: UInt32 = 0xC000_0083
  public static let sfmask: UInt32 = 0xC000_0084
  public static let fsBase: UInt32 = 0xC000_0100
  public static let gsBase: UInt32 = 0xC000_0101
  public static let kernelGSBase: UInt32 = 0xC000_0102
  public static let tscAux: UInt32 = 0xC000_0103
  public static let amdSystemConfiguration: UInt32 = 0xC001_0010
  public static let amdHardwareConfiguration: UInt32 = 0xC001_0015
  public static let amdTopOfMemory: UInt32 = 0xC001_001A
  public static let amdTopOfMemory2: UInt32 = 0xC001_001D
  public static let amdNorthBridgeConfiguration: UInt32 = 0xC001_001F
  public static let amdVirtualMachineControl: UInt32 = 0xC001_0114
  public static let amdLoadStoreConfiguration: UInt32 = 0xC001_1020
  public static let amdInstructionCacheConfiguration: UInt32 = 0xC001_1021
  public static let amdDataCacheConfiguration: UInt32 = 0xC001_1022
  public static let amdBusUnitConfiguration2: UInt32 = 0xC001_102A
  public static let amdDecodeConfiguration: UInt32 = 0xC001_1029
}

extension CPU {
  /// Number of variable-range MTRRs reported in MTRRcap.
  static let variableMTRRCount: UInt64 = 8

  /// The current virtual time in nanoseconds.
  func virtualNanoseconds() -> UInt64 {
    if let clock = system.clock { return clock.nanoseconds }
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
  }

  /// The time-stamp counter: virtual time scaled to the TSC frequency, plus `tscOffset`.
  public func timeStampCounter() -> UInt64 {
    let nanoseconds = virtualNanoseconds()
    let khz = system.tscKilohertz
    let ticks =
      khz == 1_000_000
      ? nanoseconds
      : (nanoseconds / 1_000_000) &* khz &+ (nanoseconds % 1_000_000) &* khz / 1_000_000
    return ticks &+ tscOffset
  }

  private func isStoredMSR(_ index: UInt32) -> Bool {
    switch index {
    case MSRIndex.mtrrPhysBase0..<(MSRIndex.mtrrPhysBase0 + UInt32(Self.variableMTRRCount) * 2),
      MSRIndex.mtrrFixed64K, MSRIndex.mtrrFixed16K80000, MSRIndex.mtrrFixed16KA0000,
      MSRIndex.mtrrFixed4KC0000...(MSRIndex.mtrrFixed4KC0000 + 7), MSRIndex.mtrrDefaultType,
      MSRIndex.featureControl, MSRIndex.biosSignID, MSRIndex.tscAdjust, MSRIndex.mcgStatus:
      return true
    case MSRIndex.amdSystemConfiguration, MSRIndex.amdHardwareConfiguration, MSRIndex.amdTopOfMemory,
      MSRIndex.amdTopOfMemory2, MSRIndex.amdNorthBridgeConfiguration, MSRIndex.amdDecodeConfiguration,
      MSRIndex.amdVirtualMachineControl,
      MSRIndex.amdLoadStoreConfiguration, MSRIndex.amdInstructionCacheConfiguration,
      MSRIndex.amdDataCacheConfiguration, MSRIndex.amdBusUnitConfiguration2:
      // AMD model-specific registers Linux reads without the _safe variants on AMD CPUs.
      return true
    default:
      return false
    }
  }

  /// Reset values of the accept-and-keep MSRs.
  static func defaultMSRValue(_ index: UInt32) -> UInt64 {
    switch index {
    case MSRIndex.amdHardwareConfiguration: return 1 << 24  // TscFreqSel: TSC at the P0 frequency
    case MSRIndex.amdTopOfMemory: return GuestMemory.pciHoleStart
    case MSRIndex.amdVirtualMachineControl: return 1 << 4  // SVMDIS
    default: return 0
    }
  }

  /// RDMSR. CPL 0; unknown MSRs raise #GP(0).
  public func readMSR(_ index: UInt32) throws(Fault) -> UInt64 {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    switch index {
    case MSRIndex.tsc: return timeStampCounter()
    case MSRIndex.platformID: return 0
    case MSRIndex.apicBase: return system.localAPIC?.apicBaseMSR ?? apicBase
    case MSRIndex.platformInfo:
      // Maximum non-turbo ratio (bits 15:8) in 100 MHz units.
      return ((system.tscKilohertz / 100_000) & 0xFF) << 8
    case MSRIndex.mtrrCapabilities:
      // Variable-range count, fixed ranges supported (bit 8), write-combining (bit 10).
      return Self.variableMTRRCount | (1 << 8) | (1 << 10)
    case MSRIndex.sysenterCS: return sysenterCS
    case MSRIndex.sysenterESP: return sysenterESP
    case MSRIndex.sysenterEIP: return sysenterEIP
    case MSRIndex.mcgCapabilities: return 0
    case MSRIndex.miscEnable: return system.miscEnable
    case MSRIndex.pat: return pat
    case MSRIndex.tscDeadline:
      return system.localAPIC?.readTSCDeadline() ?? system.tscDeadlineValue
    case MSRIndex.efer: return efer
    case MSRIndex.star: return star
    case MSRIndex.lstar: return lstar
    case MSRIndex.cstar: return cstar
    case MSRIndex.sfmask: return sfmask
    case MSRIndex.fsBase: return segments[Int(SegmentIndex.fs)].base
    case MSRIndex.gsBase: return segments[Int(SegmentIndex.gs)].base
    case MSRIndex.kernelGSBase: return kernelGSBase
    case MSRIndex.tscAux: return tscAux
    case LocalAPIC.x2APICMSRs:
      guard let value = system.localAPIC?.readX2APICRegister(index) else { throw .generalProtection(0) }
      return value
    default:
      if let value = readPerformanceMSR(index) { return value }
      if isStoredMSR(index) {
        if index == MSRIndex.featureControl { return system.storedMSRs[index] ?? 1 }  // locked, no VMX
        return system.storedMSRs[index] ?? Self.defaultMSRValue(index)
      }
      throw .generalProtection(0)
    }
  }

  /// WRMSR. CPL 0; unknown MSRs and reserved bits raise #GP(0).
  public func writeMSR(_ index: UInt32, _ value: UInt64) throws(Fault) {
    guard currentPrivilegeLevel == 0 else { throw .generalProtection(0) }
    switch index {
    case MSRIndex.tsc:
      tscOffset = value &- (timeStampCounter() &- tscOffset)
    case MSRIndex.apicBase:
      // Reserved bits (0-7, 9, base bits at or above MAXPHYADDR) and the forbidden x2APIC
      // transitions raise #GP; BSP is read-only. A base other than 0xFEE00000 is decoded by
      // this CPU's memory path; in x2APIC mode no page is decoded.
      if let apic = system.localAPIC {
        guard apic.writeAPICBaseMSR(value, physicalAddressBits: Int(system.physicalAddressBits)) else {
          throw .generalProtection(0)
        }
        apicBase = apic.apicBaseMSR
      } else {
        let baseMask: UInt64 = ((1 << system.physicalAddressBits) - 1) & ~0xFFF
        if value & ~(baseMask | 0x900) != 0 { throw .generalProtection(0) }
        apicBase = (value & ~0x100) | (apicBase & 0x100)
      }
      refreshAPICDecoding()
    case MSRIndex.sysenterCS: sysenterCS = value & 0xFFFF
    case MSRIndex.sysenterESP:
      guard isCanonical(value) else { throw .generalProtection(0) }
      sysenterESP = value
    case MSRIndex.sysenterEIP:
      guard isCanonical(value) else { throw .generalProtection(0) }
      sysenterEIP = value
    case MSRIndex.mcgStatus, MSRIndex.biosSignID, MSRIndex.platformID:
      system.storedMSRs[index] = value
    case MSRIndex.miscEnable: system.miscEnable = value
    case MSRIndex.pat:
      for byteIndex in 0..<8 {
        let type = (value >> (UInt64(byteIndex) * 8)) & 0xFF
        if type == 2 || type == 3 || type > 7 { throw .generalProtection(0) }
      }
      pat = value
      systemFlushTLB(includingGlobal: true)
    case MSRIndex.tscDeadline:
      if let apic = system.localAPIC {
        apic.writeTSCDeadline(value, tscOffset: tscOffset)
      } else {
        system.tscDeadlineValue = value
      }
    case MSRIndex.efer: try writeEFER(value)
    case MSRIndex.star: star = value
    case MSRIndex.lstar:
      guard isCanonical(value) else { throw .generalProtection(0) }
      lstar = value
    case MSRIndex.cstar:
      guard isCanonical(value) else { throw .generalProtection(0) }
      cstar = value
    case MSRIndex.sfmask: sfmask = value & 0xFFFF_FFFF
    case MSRIndex.fsBase, MSRIndex.gsBase:
      guard isCanonical(value) else { throw .generalProtection(0) }
      let segment = index == MSRIndex.fsBase ? SegmentIndex.fs : SegmentIndex.gs
      segments[Int(segment)].base = value
      refreshSegmentBase(segment)
    case MSRIndex.kernelGSBase:
      guard isCanonical(value) else { throw .generalProtection(0) }
      kernelGSBase = value
    case MSRIndex.tscAux: tscAux = value & 0xFFFF_FFFF
    case LocalAPIC.x2APICMSRs:
      guard let apic = system.localAPIC, apic.writeX2APICRegister(index, value: value) else {
        throw .generalProtection(0)
      }
    case MSRIndex.mtrrDefaultType:
      if value & ~0xCFF != 0 { throw .generalProtection(0) }
      system.storedMSRs[index] = value
    default:
      if try writePerformanceMSR(index, value) { return }
      if isStoredMSR(index) && index != MSRIndex.featureControl {
        system.storedMSRs[index] = value
        return
      }
      if index == MSRIndex.featureControl {
        // Writable until locked (bit 0).
        let current = system.storedMSRs[index] ?? 1
        if current & 1 != 0 { throw .generalProtection(0) }
        system.storedMSRs[index] = value
        return
      }
      throw .generalProtection(0)
    }
  }
}
