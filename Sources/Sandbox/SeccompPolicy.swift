import CSandbox
import Glibc

/// A seccomp-BPF allow-list: the system calls a thread kind may make and, for ioctl, the
/// request numbers (or request types) it may use. Anything else traps into the SIGSYS
/// reporter, which names the call and the thread kind and ends the process.
struct SeccompPolicy: Sendable {
  /// System call numbers allowed with any arguments (ioctl is governed by `ioctl`).
  let syscalls: Set<Int32>
  /// Which ioctl requests are allowed.
  let ioctl: IoctlRule
  /// System calls that fail with EACCES instead of stopping the process: calls the C library
  /// makes by itself on any thread, which it survives refused (glibc's malloc opens
  /// /proc/sys/vm/overcommit_memory the first time a thread's arena shrinks).
  var refused: Set<Int32> = []

  enum IoctlRule: Sendable {
    /// None.
    case none
    /// Exactly these request numbers.
    case numbers([UInt32])
    /// Requests whose type byte (bits 8-15) is one of these.
    case types([UInt8])
  }

  /// Installs the policy on this thread, or with `allThreads` on every thread of the process.
  func install(allThreads: Bool) throws(SandboxError) {
    let program = Self.program(self)
    let result = program.withUnsafeBufferPointer { buffer in
      hv_seccomp_install(buffer.baseAddress, UInt16(buffer.count), allThreads ? 1 : 0)
    }
    if result != 0 { throw SandboxError("cannot install the seccomp filter", errno: result) }
  }

  // MARK: The BPF program

  private static let loadWord: UInt16 = 0x20  // BPF_LD | BPF_W | BPF_ABS
  private static let jumpIfEqual: UInt16 = 0x15  // BPF_JMP | BPF_JEQ | BPF_K
  private static let jumpIfGreaterOrEqual: UInt16 = 0x35  // BPF_JMP | BPF_JGE | BPF_K
  private static let jumpAlways: UInt16 = 0x05  // BPF_JMP | BPF_JA
  private static let returnValue: UInt16 = 0x06  // BPF_RET | BPF_K
  private static let shiftRight: UInt16 = 0x74  // BPF_ALU | BPF_RSH | BPF_K
  private static let andValue: UInt16 = 0x54  // BPF_ALU | BPF_AND | BPF_K
  // Offsets into struct seccomp_data.
  private static let numberOffset: UInt32 = 0
  private static let archOffset: UInt32 = 4
  private static let secondArgumentOffset: UInt32 = 24  // args[1], low 32 bits (ioctl's request)
  /// Numbers from here up are x32 system calls, never allowed.
  private static let x32Bit: UInt32 = 0x4000_0000

  static func program(_ policy: SeccompPolicy) -> [sock_filter] {
    func statement(_ code: UInt16, _ k: UInt32) -> sock_filter { sock_filter(code: code, jt: 0, jf: 0, k: k) }
    func jump(_ code: UInt16, _ k: UInt32, _ jt: UInt8, _ jf: UInt8) -> sock_filter {
      sock_filter(code: code, jt: jt, jf: jf, k: k)
    }
    let allow = statement(returnValue, HV_SECCOMP_RET_ALLOW)
    let trap = statement(returnValue, HV_SECCOMP_RET_TRAP)
    var code: [sock_filter] = [
      statement(loadWord, archOffset),
      jump(jumpIfEqual, HV_AUDIT_ARCH_X86_64, 1, 0),
      statement(returnValue, HV_SECCOMP_RET_KILL_PROCESS),
      statement(loadWord, numberOffset),
      jump(jumpIfGreaterOrEqual, x32Bit, 0, 1),
      trap,
    ]
    var ioctlJump: Int?
    if case .none = policy.ioctl {
    } else {
      code.append(jump(jumpIfEqual, UInt32(HV_SYS_ioctl), 0, 1))
      ioctlJump = code.count
      code.append(statement(jumpAlways, 0))
    }
    for number in policy.syscalls.sorted() where number != HV_SYS_ioctl {
      code.append(jump(jumpIfEqual, UInt32(number), 0, 1))
      code.append(allow)
    }
    for number in policy.refused.sorted() {
      code.append(jump(jumpIfEqual, UInt32(number), 0, 1))
      code.append(statement(returnValue, HV_SECCOMP_RET_ERRNO | UInt32(EACCES)))
    }
    code.append(trap)
    if let ioctlJump {
      code[ioctlJump].k = UInt32(code.count - ioctlJump - 1)
      code.append(statement(loadWord, secondArgumentOffset))
      switch policy.ioctl {
      case .none: break
      case .numbers(let numbers):
        for number in numbers {
          code.append(jump(jumpIfEqual, number, 0, 1))
          code.append(allow)
        }
      case .types(let types):
        code.append(statement(shiftRight, 8))
        code.append(statement(andValue, 0xFF))
        for type in types {
          code.append(jump(jumpIfEqual, UInt32(type), 0, 1))
          code.append(allow)
        }
      }
      code.append(trap)
    }
    return code
  }

  // MARK: The policies

  /// What every thread needs: memory, synchronization, signals, time, threads and exit.
  private static let common: Set<Int32> = [
    HV_SYS_read, HV_SYS_write, HV_SYS_readv, HV_SYS_writev, HV_SYS_close, HV_SYS_fstat, HV_SYS_newfstatat, HV_SYS_lseek,
    HV_SYS_mmap, HV_SYS_munmap, HV_SYS_mprotect, HV_SYS_madvise, HV_SYS_brk, HV_SYS_mremap,
    HV_SYS_futex, HV_SYS_rt_sigprocmask, HV_SYS_rt_sigreturn, HV_SYS_rt_sigtimedwait, HV_SYS_sigaltstack,
    HV_SYS_clock_gettime, HV_SYS_clock_nanosleep, HV_SYS_nanosleep, HV_SYS_gettimeofday, HV_SYS_sched_yield,
    HV_SYS_getpid, HV_SYS_gettid, HV_SYS_tgkill, HV_SYS_exit, HV_SYS_exit_group, HV_SYS_restart_syscall,
    HV_SYS_poll, HV_SYS_ppoll, HV_SYS_getrandom, HV_SYS_sched_getaffinity, HV_SYS_set_robust_list, HV_SYS_rseq,
  ]

  /// Disk and network backends: positioned I/O, flushes, discards, balloon page release,
  /// the passt socket.
  private static let deviceIO: Set<Int32> = [
    HV_SYS_pread64, HV_SYS_pwrite64, HV_SYS_preadv, HV_SYS_pwritev, HV_SYS_preadv2, HV_SYS_pwritev2, HV_SYS_fsync,
    HV_SYS_fdatasync, HV_SYS_fallocate, HV_SYS_sendmsg, HV_SYS_recvmsg, HV_SYS_sendto, HV_SYS_recvfrom,
    HV_SYS_eventfd2, HV_SYS_fcntl,
  ]

  /// Starting a thread (vCPU threads start device workers when the guest enables a device),
  /// naming it and narrowing its filter.
  private static let threads: Set<Int32> = [HV_SYS_clone, HV_SYS_clone3, HV_SYS_prctl, HV_SYS_seccomp]

  /// The main thread, the API's event loops and the threads that existed before the sandbox:
  /// everything the process does after start-up (the union of the other kinds, plus the API
  /// socket's connections, snapshot files inside the jail, migration connections).
  static let process = SeccompPolicy(
    syscalls: common.union(deviceIO).union(threads).union(
      [
        HV_SYS_ioctl, HV_SYS_rt_sigaction, HV_SYS_openat, HV_SYS_unlink, HV_SYS_unlinkat, HV_SYS_rename,
        HV_SYS_renameat,
        HV_SYS_mkdir, HV_SYS_mkdirat, HV_SYS_ftruncate, HV_SYS_statx, HV_SYS_getdents64, HV_SYS_readlink, HV_SYS_getcwd,
        HV_SYS_dup, HV_SYS_dup3, HV_SYS_pipe2, HV_SYS_epoll_create1, HV_SYS_epoll_ctl, HV_SYS_epoll_wait,
        HV_SYS_epoll_pwait,
        HV_SYS_timerfd_create, HV_SYS_timerfd_settime, HV_SYS_socket, HV_SYS_socketpair, HV_SYS_connect, HV_SYS_accept,
        HV_SYS_accept4, HV_SYS_bind, HV_SYS_listen, HV_SYS_shutdown, HV_SYS_getsockopt, HV_SYS_setsockopt,
        HV_SYS_getsockname,
        HV_SYS_getpeername, HV_SYS_uname, HV_SYS_sysinfo, HV_SYS_getrusage, HV_SYS_times, HV_SYS_membarrier,
        HV_SYS_wait4,
        HV_SYS_kill, HV_SYS_getuid, HV_SYS_geteuid, HV_SYS_getgid, HV_SYS_getegid, HV_SYS_getppid,
        HV_SYS_getpgrp,
        HV_SYS_sched_setaffinity,
        HV_SYS_fchmod, HV_SYS_sync_file_range, HV_SYS_flock, HV_SYS_access, HV_SYS_faccessat, HV_SYS_faccessat2,
      ]),
    ioctl: .types([0xAE, 0x54]))  // KVM; terminal and TUN

  /// A vCPU thread: KVM's vCPU and VM requests by number, device register writes that reach
  /// backends, starting device workers. No opening of files, no sockets.
  static let vcpu = SeccompPolicy(
    syscalls: common.union(deviceIO).union(threads).union([HV_SYS_ioctl, HV_SYS_rt_sigaction]),
    ioctl: .numbers(ioctlNumbers(hv_sandbox_vcpu_ioctls)), refused: [HV_SYS_openat])

  /// A device worker thread: its queues and backend only; no KVM, no threads, no files.
  static let deviceWorker = SeccompPolicy(
    syscalls: common.union(deviceIO).union([HV_SYS_ioctl]),
    ioctl: .numbers(ioctlNumbers(hv_sandbox_worker_ioctls)), refused: [HV_SYS_openat])

  private static func ioctlNumbers(_ list: (UnsafeMutablePointer<Int32>?) -> UnsafePointer<UInt32>?) -> [UInt32] {
    var count: Int32 = 0
    guard let numbers = list(&count) else { return [] }
    return Array(UnsafeBufferPointer(start: numbers, count: Int(count)))
  }
}
