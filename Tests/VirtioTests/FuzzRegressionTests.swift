import Foundation
import PCI
import Synchronization
import Testing
import VMCore

@testable import Virtio

/// Defects the libFuzzer targets (docs/fuzzing.md) found, each kept as a test.
@Suite struct FuzzRegressionTests {
  /// The `state` target's leak check: a virtio transport and its queue set referred to each
  /// other strongly (the queue set kept the transport for its interrupts), so no virtio device
  /// of a machine was ever freed, and with them the machine's guest RAM. Dropping the last
  /// outside reference must free the transport, its device model and guest memory.
  @Test(arguments: [false, true])
  func aDroppedTransportFreesItsDeviceAndGuestMemory(activated: Bool) throws {
    weak var weakTransport: VirtioPCIDevice?
    weak var weakModel: VirtioEntropy?
    weak var weakMemory: GuestMemory?
    do {
      let memory = try GuestMemory(size: 1 << 20)
      let model = VirtioEntropy()
      let transport = VirtioPCIDevice(model: model, memory: memory)
      if activated {
        // Through DRIVER_OK, so the queue set has been handed to the device and its worker.
        let common = VirtioPCIDevice.Layout.commonOffset
        transport.barWrite(bar: 0, offset: common + 0x14, size: 1, value: 3)
        transport.barWrite(bar: 0, offset: common + 0x08, size: 4, value: 1)
        transport.barWrite(bar: 0, offset: common + 0x0C, size: 4, value: 1)
        transport.barWrite(bar: 0, offset: common + 0x14, size: 1, value: 0xB)
        transport.barWrite(bar: 0, offset: common + 0x14, size: 1, value: 0xF)
        #expect(transport.deviceStatus == 0xF)
        transport.shutdown()
      }
      weakTransport = transport
      weakModel = model
      weakMemory = memory
    }
    #expect(weakTransport == nil, "the virtio transport outlived every reference to it")
    #expect(weakModel == nil, "the device model outlived its transport")
    #expect(weakMemory == nil, "guest RAM outlived the devices that used it")
  }

  /// A network backend whose first `receive` waits until the test lets it go, then hands out
  /// one frame: the device's worker sits in `receive` holding its receive state.
  final class HeldFrameBackend: NetworkBackend {
    let entered = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    private let calls = Mutex(0)
    var pollDescriptor: Int32 { -1 }
    func transmit(_ vectors: UnsafeBufferPointer<iovec>) -> Bool { true }
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
      let call = calls.withLock { calls in
        calls += 1
        return calls
      }
      guard call == 1 else { return 0 }
      entered.signal()
      release.wait()
      for index in 0..<64 { buffer[index] = UInt8(truncatingIfNeeded: index) }
      return 64
    }
  }

  /// The `virtio` target: a virtio-net worker delivering a frame (receive state held, waiting
  /// for the queue set) and a device reset on a vCPU (queue set held, waiting for the receive
  /// state) deadlocked; the kernel's PI futex reported it and Swift's Mutex stopped the process
  /// ("Recursive call to lock Mutex"). The reset must complete and the device work again.
  @Test func resetWhileTheWorkerDeliversAFrame() throws {
    let machine = try TestMachine()
    let backend = HeldFrameBackend()
    let driver = try VirtioDriver(machine: machine, model: VirtioNet(backend: backend))
    driver.start(queueCount: 2)
    #expect(backend.entered.wait(timeout: .now() + 10) == .success, "the worker never asked for a frame")
    // Let the frame go while the reset below holds the queue set.
    let releaser = Thread {
      usleep(200_000)
      backend.release.signal()
    }
    releaser.start()
    let resetDone = DispatchSemaphore(value: 0)
    let transport = driver.device
    let resetter = Thread {
      transport.barWrite(bar: 0, offset: VirtioPCIDevice.Layout.commonOffset + 0x14, size: 1, value: 0)
      resetDone.signal()
    }
    resetter.start()
    #expect(resetDone.wait(timeout: .now() + 10) == .success, "the device reset never returned")
    #expect(driver.status == 0)
    // A fresh start works: the driver gets a receive buffer filled by nothing (no frame
    // waits), and a transmitted frame is consumed.
    driver.start(queueCount: 2)
    let transmit = driver.queues[1]
    transmit.submit([(0x40_0000, 12 + 60, false)])
    #expect(transmit.waitForUsed(1), "the restarted device does not transmit")
  }
}
