import PCI
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
}
