import VMCore

extension BootImage {
  /// The boot image of a machine restored from a snapshot: nothing was loaded, and the vCPU
  /// state comes from the snapshot rather than from `state`.
  public static var restoredFromSnapshot: BootImage {
    BootImage(
      state: X86CPUState(), format: .raw, entry: 0, kernelRange: 0..<0, initrdRange: nil, commandLineAddress: nil,
      bootParamsAddress: nil, multibootInfoAddress: nil, memoryMap: [], warnings: [])
  }
}
