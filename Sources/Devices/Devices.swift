// Module Devices: the legacy PC devices (16550A UART, i8042 keyboard controller, CMOS RTC,
// isa-debug-exit, system control ports A and B, POST code port) and the host terminal
// console that feeds the UART. `LegacyDevices.install` wires them at their standard ports.
