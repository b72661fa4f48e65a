#!/usr/bin/python3
# debusine-virt guest helper: runs commands for the host over a framed byte stream.
# Only modules of Debian's python3-minimal: debusine's images promise no more.
import errno, fcntl, os, select, signal, stat, struct, sys, time

# What the hello announces: the server passes the digest of this file (--version).
VERSION = '-'
HEADER = struct.Struct('>IBI')
SPAWN, STDIN, STDIN_EOF, KILL, CREDIT, PING, RESUMED = 1, 2, 3, 4, 5, 6, 7
STDOUT, STDERR, EXIT, STDIN_CREDIT, PONG, HELLO = 0x11, 0x12, 0x13, 0x14, 0x15, 0x16
CHUNK = 256 << 10
# termios is not in python3-minimal: Linux's TIOCSWINSZ, asm-generic or the old ioctl
# encoding of powerpc, mips and sparc.
TIOCSWINSZ = 0x80087467 if os.uname().machine.startswith(('ppc', 'mips', 'sparc')) else 0x5414
# FIONREAD, likewise: powerpc and sparc use _IOR('f', 127, int), mips its own number.
FIONREAD = (0x4004667f if os.uname().machine.startswith(('ppc', 'sparc'))
            else 0x467f if os.uname().machine.startswith('mips') else 0x541b)
OUTBUF_LIMIT = 1 << 20
SPLICE_F_NONBLOCK = 2
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207
PORT_BATCH = 4 << 20
# A virtio-serial port hands out one buffer (a page) per read(), and its driver has no
# read_iter: readv() then reads each of its iovecs with a read() of its own, all in one
# system call, stopping at the first short one (so what arrives stays contiguous). Page-sized
# iovecs take up to a MiB a call where read() took 4 KiB; pipes and sockets fill them at once.
# Each call costs a buffer per iovec in Python, so the first read of a turn takes one page
# only: the small frames of a command's output traffic (credits) need no more.
READ_PIECE = 4096
READ_PIECES = 256
# Output still arriving this long after a command exited (and after everything it wrote
# itself was delivered) belongs to processes it left behind; waiting for them to close
# their end would hang the caller.
LINGER = 0.2
# What a command starts with at its default: every signal (Python ignores SIGPIPE and
# SIGXFSZ, and an ignored signal stays ignored across exec; the helper handles SIGCHLD).
# glibc's posix_spawn still leaves its own two (32 and 33) ignored; glibc sets them up again
# in every program it starts.
RESET_SIGNALS = ([number for number in signal.valid_signals() if number not in (signal.SIGKILL, signal.SIGSTOP)]
                 if hasattr(signal, 'valid_signals')
                 else [signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM])
# os.posix_spawn with setsid: Python 3.8 and glibc 2.26 on; older guests fork.
POSIX_SPAWN = hasattr(os, 'posix_spawn') and hasattr(os, 'POSIX_SPAWN_DUP2')
# What a file spawn runs for what the helper does not read itself: the host's own copy script.
SEND_FILE_SCRIPT = 'cat -- "$1"; if [ -x "$1" ]; then exit 3; fi'
# File systems whose reads wait on nothing but the guest's own disk and memory. A file the host
# asks for elsewhere (NFS, FUSE, 9p; /proc and /sys, whose files can block or fail mid-read)
# is read by `cat`, so that reading it waits in `cat`, not in the helper every command needs.
LOCAL_FILE_SYSTEMS = {'ext2', 'ext3', 'ext4', 'xfs', 'btrfs', 'f2fs', 'tmpfs', 'ramfs', 'overlay',
                      'vfat', 'squashfs', 'iso9660'}
BASE_ENV = {
    'PATH': '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    'HOME': '/root', 'USER': 'root', 'LOGNAME': 'root', 'SHELL': '/bin/bash',
    'LANG': 'C.UTF-8',
}


def consume(buffer, offset, written):
    """Moves a buffer's read offset on; empties or compacts the buffer now and then."""
    offset += written
    if offset == len(buffer):
        buffer.clear()
        return 0
    if offset > (1 << 20):
        del buffer[:offset]
        return 0
    return offset


def local_file_system(fd):
    """Whether the file open as `fd` (O_PATH will do) is on one of LOCAL_FILE_SYSTEMS: its
    mount's id (fdinfo's mnt_id) looked up in /proc/self/mountinfo. Not by st_dev, which on
    btrfs (and some overlays) is not the mount's device. False when it cannot tell."""
    try:
        with open('/proc/self/fdinfo/%d' % fd, 'rb') as info:
            mount = next((line.split()[1] for line in info if line.startswith(b'mnt_id:')), None)
        with open('/proc/self/mountinfo', 'rb') as mounts:
            for line in mounts:
                fields = line.split()
                if mount is not None and fields and fields[0] == mount and b'-' in fields[6:]:
                    after = fields.index(b'-', 6) + 1
                    return after < len(fields) and fields[after].decode(errors='replace') in LOCAL_FILE_SYSTEMS
    except (OSError, IndexError):
        pass
    return False


def readable(fd):
    """Bytes waiting in a pipe or terminal; 0 when that cannot be told."""
    try:
        return struct.unpack('i', fcntl.ioctl(fd, FIONREAD, b'\0\0\0\0'))[0]
    except OSError:
        return 0


def nonblocking(fd):
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


class Command:
    def __init__(self, channel):
        self.channel = channel
        self.pid = None
        self.stdin = self.stdout = self.stderr = None
        self.pending = bytearray()
        # Bytes of pending already written: buffers are consumed by moving an offset and
        # compacted rarely, since deleting their front on every write is quadratic.
        self.pending_offset = 0
        self.stdin_eof = False
        self.credit = 0
        # Output through pipes (not a terminal).
        self.pipes = True
        # Output the kernel can splice: not a terminal's, nor a file's on a file system
        # without splice_read (some of /proc).
        self.splice = True
        # A `file` spawn: the output is the content of the file at `path`, no process runs.
        self.file = False
        self.path = None
        self.status = None
        self.exited_at = None
        # Bytes the command itself left in each output pipe when it exited: they are its
        # output and are delivered however long that takes, before the linger starts.
        self.owed = {}


class Helper:
    def __init__(self, port, port_out=None):
        # One read-write port (a virtio-serial port, a socket), or two pipes (--stdio).
        self.port = port
        self.port_out = port if port_out is None else port_out
        nonblocking(self.port)
        nonblocking(self.port_out)
        self.inbuf = bytearray()
        self.readbuf = memoryview(bytearray(READ_PIECE * READ_PIECES))
        self.readpieces = [self.readbuf[i:i + READ_PIECE] for i in range(0, len(self.readbuf), READ_PIECE)]
        self.readpiece = self.readpieces[:1]
        self.outbuf = bytearray()
        self.outbuf_offset = 0
        self.commands = {}
        self.by_pid = {}
        self.posix_spawn = POSIX_SPAWN
        # Output is spliced from pipes to the port where the kernel can (Python 3.10 on).
        self.splice = hasattr(os, 'splice')
        if self.splice:
            self.splice_r, self.splice_w = os.pipe()
            nonblocking(self.splice_r)
            try:
                fcntl.fcntl(self.splice_w, 1031, CHUNK)
            except OSError:
                pass
        # Where the helper runs, to come back to after a command's spawn in its directory.
        self.home = os.open('.', getattr(os, 'O_PATH', os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
        self.wake_r, self.wake_w = os.pipe()
        nonblocking(self.wake_r)
        nonblocking(self.wake_w)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(self, channel, kind, payload=b''):
        self.outbuf += HEADER.pack(channel, kind, len(payload))
        self.outbuf += payload

    def hello(self, status=''):
        try:
            with open('/proc/sys/kernel/random/boot_id') as f:
                boot_id = f.read().strip()
        except OSError:
            boot_id = ''
        self.send(0, HELLO, ('%s %s %s' % (boot_id or '-', VERSION, status)).strip().encode())

    def resumed(self, payload):
        # The VM was restored from a saved state: every guest restored from it would
        # otherwise share the saved clock and random state. The host sends its time and
        # fresh entropy; the entropy is credited and the kernel's generator reseeded
        # from it at once (vmgenid, where the kernel has it, does that too). The hello
        # that answers says what was done, for the host to check.
        done = []
        if len(payload) >= 8:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, struct.unpack_from('>Q', payload)[0])
                done.append('clock-set')
            except (OSError, AttributeError) as e:
                done.append('clock-failed:%s' % getattr(e, 'errno', ''))
        seed = payload[8:]
        if seed:
            try:
                fd = os.open('/dev/random', os.O_WRONLY | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, RNDADDENTROPY, struct.pack('ii', len(seed) * 8, len(seed)) + seed)
                    fcntl.ioctl(fd, RNDRESEEDCRNG)
                finally:
                    os.close(fd)
                done.append('reseeded')
            except OSError as e:
                done.append('reseed-failed:%s' % e.errno)
        self.hello(' '.join(done))

    def spawn(self, channel, request):
        command = Command(channel)
        self.commands[channel] = command
        try:
            fields = [os.fsdecode(f) for f in request.split(b'\0')]
            head = fields[0].split(' ')
            command.credit = int(head[0])
            terminal = (int(head[2]), int(head[3])) if len(head) == 4 and head[1] == 'pty' else None
            whole_file = head[1:] == ['file']
            cwd = fields[1] or '/'
            count = int(fields[2])
            env = dict(BASE_ENV)
            for entry in fields[3:3 + count]:
                key, _, value = entry.partition('=')
                env[key] = value
            argv = fields[3 + count:]
            if not argv or whole_file and len(argv) != 1:
                raise ValueError('empty argv' if not argv else 'a file spawn names one file')
        except (ValueError, IndexError) as e:
            self.finish(command, 'error bad spawn request: %s' % e)
            return
        if whole_file:
            path = os.path.join(cwd, argv[0])
            if self.send_file(command, path):
                return
            # Not a regular file (a FIFO, a device) or not on a local file system: `cat` reads
            # it as it must be read, with the statuses of a file spawn.
            argv = ['/bin/sh', '-ec', SEND_FILE_SCRIPT, 'sh', path]
        if terminal is not None:
            # A pseudo-terminal: the master is the command's stdin and stdout.
            master, slave = os.openpty()
            command.pipes = command.splice = False
            fcntl.ioctl(slave, TIOCSWINSZ, struct.pack('HHHH', terminal[0], terminal[1], 0, 0))
            in_r, in_w, out_r, out_w, err_r, err_w = slave, os.dup(master), master, slave, None, slave
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            # 1 MiB pipes (F_SETPIPE_SZ) let the command run on while this loop is busy.
            for fd in (in_w, out_w):
                try:
                    fcntl.fcntl(fd, 1031, 1 << 20)
                except OSError:
                    pass
        if terminal is None and self.posix_spawn:
            try:
                pid, report = self.spawn_plain(argv, env, cwd, in_r, out_w, err_w), b''
            except OSError as e:
                pid, report = None, ('%d %s' % (e.errno or 0, e.strerror or e)).encode()
            except (ValueError, TypeError) as e:
                # An empty program name or environment name, which exec would refuse too.
                pid, report = None, ('0 %s' % e).encode()
            except NotImplementedError:
                # A C library without POSIX_SPAWN_SETSID: fork from now on.
                self.posix_spawn = False
            if self.posix_spawn:
                for fd in {in_r, out_w, err_w}:
                    os.close(fd)
                self.started(command, pid, argv, report, in_w, out_r, err_r)
                return
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                if terminal is not None:
                    # Opening the terminal as a session leader makes it the controlling one.
                    os.close(out_r)
                    os.close(os.open(os.ttyname(slave), os.O_RDWR))
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                signal.set_wakeup_fd(-1)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                for number in RESET_SIGNALS:
                    try:
                        signal.signal(number, signal.SIG_DFL)
                    except (OSError, ValueError):
                        pass
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            except OSError as e:
                os.write(report_w, ('%d %s' % (e.errno or 0, e.strerror or e)).encode())
            except BaseException as e:
                os.write(report_w, ('0 %s' % e).encode())
            os._exit(127)
        for fd in {in_r, out_w, err_w, report_w}:
            os.close(fd)
        report = b''
        while True:
            chunk = os.read(report_r, 4096)
            if not chunk:
                break
            report += chunk
        os.close(report_r)
        self.started(command, pid, argv, report, in_w, out_r, err_r)

    def send_file(self, command, path):
        """A `file` spawn, for a copy out of the guest: the output is the file's content,
        spliced from the page cache to the port through the helper's own pipe, with no `cat`
        and no command pipe in between (under TCG those cost as much guest time again as the
        copy itself). It ends
        with status 3 for a file root may execute (`test -x`), 0 for another, and 1 with a
        message when it cannot be read. Returns False for what the caller runs `cat` on
        instead: what is not a regular file or a directory, and a file on a file system not in
        LOCAL_FILE_SYSTEMS. (Looking at the file and opening it still happen here.)"""
        fd = None
        try:
            # Looked at through O_PATH before it is opened for reading: opening a FIFO lets a
            # writer waiting in its own open() go on, to be killed by SIGPIPE once this closes
            # it; opening a device can do anything.
            where = os.open(path, getattr(os, 'O_PATH', 0o10000000) | os.O_CLOEXEC)
            try:
                info = os.fstat(where)
                if stat.S_ISDIR(info.st_mode):
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
                if not stat.S_ISREG(info.st_mode) or not local_file_system(where):
                    return False
            finally:
                os.close(where)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                # Replaced in between: `cat` opens it again.
                os.close(fd)
                return False
        except OSError as e:
            if fd is not None:
                os.close(fd)
            command.path = path
            self.file_failed(command, e)
            command.exited_at = time.monotonic()
            return True
        command.file = True
        command.path = path
        command.stdout = fd
        command.status = 'code 3' if os.access(path, os.X_OK) else 'code 0'
        command.exited_at = time.monotonic()
        return True

    def file_failed(self, command, error):
        """A file spawn's file cannot be opened, or a read failed midway (EIO from a disk,
        say): the copy ends there with status 1 and a message, as `cat`'s would."""
        message = ('debusine-virt-helper: cannot read %s: %s\n' % (command.path, error.strerror or error)).encode()
        self.send(command.channel, STDERR, message)
        command.credit -= len(message)
        self.close_fd(command, 'stdout')
        command.status = 'code 1'

    def spawn_plain(self, argv, env, cwd, in_r, out_w, err_w):
        """Starts argv without a terminal and returns its pid: posix_spawn, which the C
        library does with vfork, where a fork of this interpreter costs a copy of its page
        tables and a fault for every page either side touches next (under TCG, most of an
        auxverb call). PATH is the command's, searched as os.execvpe does; the working
        directory is changed around the spawn (this loop is the helper's only thread)."""
        if '/' in argv[0]:
            candidates = [argv[0]]
        else:
            candidates = [os.path.join(d or '.', argv[0])
                          for d in env.get('PATH', os.defpath).split(os.pathsep)]
        os.chdir(cwd)
        try:
            first_error = None
            for path in candidates:
                if len(candidates) > 1 and not os.path.lexists(path):
                    continue
                try:
                    return os.posix_spawn(
                        path, argv, env,
                        file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                                      (os.POSIX_SPAWN_DUP2, err_w, 2)],
                        setsid=True, setsigmask=(), setsigdef=RESET_SIGNALS)
                except (FileNotFoundError, NotADirectoryError) as e:
                    first_error = first_error or e
                except OSError as e:
                    if first_error is None or isinstance(first_error, (FileNotFoundError, NotADirectoryError)):
                        first_error = e
            raise first_error or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        finally:
            # Never an exception from here: it would take the place of a started command's pid.
            try:
                os.fchdir(self.home)
            except OSError:
                os.chdir('/')

    def started(self, command, pid, argv, report, in_w, out_r, err_r):
        command.pid = pid
        if pid is not None:
            self.by_pid[pid] = command
        command.stdin, command.stdout, command.stderr = in_w, out_r, err_r
        for fd in (in_w, out_r, err_r):
            if fd is not None:
                nonblocking(fd)
        if report:
            number, _, text = report.decode(errors='replace').partition(' ')
            message = 'debusine-virt-helper: cannot run %s: %s\n' % (argv[0], text)
            self.send(command.channel, STDERR, message.encode())
            command.credit -= len(message)
            command.forced = 126 if int(number or 0) in (errno.EACCES, errno.ENOEXEC) else 127
        if pid is None:
            # Nothing started, nothing to reap: it has exited as far as the caller can tell.
            command.status = 'code %d' % command.forced
            command.exited_at = time.monotonic()

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            command = self.by_pid.pop(pid, None)
            if command is None:
                continue
            forced = getattr(command, 'forced', None)
            if forced is not None:
                command.status = 'code %d' % forced
            elif os.WIFSIGNALED(status):
                command.status = 'signal %d' % os.WTERMSIG(status)
            else:
                command.status = 'code %d' % os.WEXITSTATUS(status)
            command.exited_at = time.monotonic()
            # Everything the command wrote is in its pipes by now; what comes later is
            # from processes it left behind.
            for name in ('stdout', 'stderr'):
                fd = getattr(command, name)
                if fd is not None:
                    command.owed[name] = readable(fd)

    def close_fd(self, command, name):
        fd = getattr(command, name)
        if fd is not None:
            os.close(fd)
            setattr(command, name, None)

    def finish(self, command, status):
        for name in ('stdin', 'stdout', 'stderr'):
            self.close_fd(command, name)
        self.send(command.channel, EXIT, status.encode())
        self.commands.pop(command.channel, None)

    def handle(self, channel, kind, payload):
        command = self.commands.get(channel)
        if kind == SPAWN:
            if command is None:
                self.spawn(channel, payload)
        elif kind == PING:
            self.send(channel, PONG, payload)
        elif kind == RESUMED and channel == 0:
            self.resumed(payload)
        elif command is None:
            return
        elif kind == STDIN:
            if command.stdin is None:
                self.send(channel, STDIN_CREDIT, struct.pack('>I', len(payload)))
            elif len(command.pending) == command.pending_offset:
                # Nothing waiting before it: straight into the pipe, what it takes.
                written = self.write_stdin(command, payload)
                command.pending += payload[written:]
                if len(command.pending) == command.pending_offset and command.stdin_eof:
                    self.close_fd(command, 'stdin')
            else:
                command.pending += payload
        elif kind == STDIN_EOF:
            command.stdin_eof = True
            if len(command.pending) == command.pending_offset:
                self.close_fd(command, 'stdin')
        elif kind == KILL:
            try:
                number = int(payload or b'15')
            except ValueError:
                return
            if command.file:
                # No process to signal: the copy stops as `cat` killed by the signal would
                # (SIGPIPE too: the caller's reader went away).
                if command.stdout is not None and 0 < number < 65:
                    self.close_fd(command, 'stdout')
                    command.status = 'signal %d' % number
            elif number == signal.SIGPIPE and command.pipes:
                # The caller's reader went away: as with a real pipe, the command's next write
                # to stdout fails (SIGPIPE, or EPIPE where it ignores that), and nothing else
                # in its group is signalled; a stdout already ended has nobody to tell.
                if command.stdout is not None:
                    self.close_fd(command, 'stdout')
                    command.owed.pop('stdout', None)
            elif command.pid is not None and command.status is None:
                try:
                    os.killpg(command.pid, number)
                except (OSError, OverflowError):
                    pass
        elif kind == CREDIT and len(payload) == 4:
            command.credit += struct.unpack('>I', payload)[0]

    def read_port(self):
        # Reading on until the port is empty, before parsing and polling again, keeps the
        # per-read cost to a system call (under TCG the rest of a loop turn costs far more).
        got = 0
        while got < PORT_BATCH:
            try:
                count = os.readv(self.port, self.readpieces if got >= READ_PIECE else self.readpiece)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if got:
                    break
                return False
            if not count:
                if got:
                    break
                return False
            self.inbuf += self.readbuf[:count]
            got += count
        offset = 0
        while len(self.inbuf) - offset >= HEADER.size:
            channel, kind, length = HEADER.unpack_from(self.inbuf, offset)
            end = offset + HEADER.size + length
            if len(self.inbuf) < end:
                break
            if kind == STDIN:
                # Stdin is the bulk: a view, written on from there or copied once.
                with memoryview(self.inbuf) as view, view[offset + HEADER.size:end] as payload:
                    self.handle(channel, kind, payload)
            else:
                self.handle(channel, kind, bytes(self.inbuf[offset + HEADER.size:end]))
            offset = end
        del self.inbuf[:offset]
        return True

    def outbuf_size(self):
        return len(self.outbuf) - self.outbuf_offset

    def write_port(self):
        # The port takes a few KiB per write(): write on until it is full or we are empty.
        while self.outbuf_size():
            try:
                with memoryview(self.outbuf) as view:
                    written = os.write(self.port_out, view[self.outbuf_offset:])
            except (BlockingIOError, InterruptedError):
                return
            if not written:
                # A virtio console whose queue failed takes nothing and says so with 0: writing
                # on would spin for ever; ending lets the host see the helper go.
                raise RuntimeError('the port takes no more bytes')
            self.outbuf_offset = consume(self.outbuf, self.outbuf_offset, written)

    def write_stdin(self, command, data=None):
        """Writes to a command's stdin what is pending, or data (nothing pending then);
        acknowledges what it took and returns how much of data that was."""
        try:
            if data is not None:
                written = os.write(command.stdin, data)
            else:
                with memoryview(command.pending) as view:
                    written = os.write(command.stdin, view[command.pending_offset:])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            # The command closed its stdin: what it did not take is acknowledged anyway
            # so the host does not wait for credit forever.
            written = len(data) if data is not None else len(command.pending) - command.pending_offset
            self.close_fd(command, 'stdin')
        self.send(command.channel, STDIN_CREDIT, struct.pack('>I', written))
        if data is None:
            command.pending_offset = consume(command.pending, command.pending_offset, written)
            if not command.pending and command.stdin_eof:
                self.close_fd(command, 'stdin')
        return written

    def splice_output(self, command, fd, kind):
        """Sends what waits in a command's output pipe as one frame whose payload the
        kernel moves from the pipe to the port (splice): under TCG every copy made here
        costs far more than the kernel handing pipe pages on. The bytes go through a pipe
        of the helper's own first, and the port always takes all of that pipe: a virtio
        console given fewer bytes than its pipe holds queues empty buffers, which QEMU
        refuses by breaking the device ("zero sized buffers are not allowed"). Only with
        nothing queued, so frames stay in order. Returns the payload's size, 0 when
        nothing was sent (the usual read then sees the end of the output)."""
        try:
            size = os.splice(fd, self.splice_w, min(CHUNK, command.credit), flags=SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            # A kernel that cannot splice these (or a file system, for a file): copy from now
            # on. Anything else (ENOMEM, say) only costs this turn.
            if e.errno in (errno.EINVAL, errno.ENOSYS):
                if command.file:
                    command.splice = False
                else:
                    self.splice = False
            return 0
        if not size:
            return 0
        header = HEADER.pack(command.channel, kind, size)
        try:
            written = os.write(self.port_out, header)
        except (BlockingIOError, InterruptedError):
            written = 0
        moved = 0
        if written < len(header):
            self.outbuf += header[written:]
        else:
            while moved < size:
                try:
                    count = os.splice(self.splice_r, self.port_out, size - moved, flags=SPLICE_F_NONBLOCK)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.ENOSYS):
                        self.splice = False
                    break
                if not count:
                    break
                moved += count
        # What the port did not take goes the usual way, after the header. The pipe holds it
        # all, unless the port took bytes it then dropped (a virtio queue that failed): the
        # stream is broken then, and the helper ends rather than send a short frame.
        while moved < size:
            try:
                data = os.read(self.splice_r, size - moved)
            except BlockingIOError:
                data = b''
            if not data:
                raise RuntimeError('the port lost %d bytes of a frame' % (size - moved))
            self.outbuf += data
            moved += len(data)
        return size

    def read_output(self, command, name, kind):
        fd = getattr(command, name)
        if self.splice and command.splice and not self.outbuf_size():
            size = self.splice_output(command, fd, kind)
            if size:
                if name in command.owed:
                    command.owed[name] = max(0, command.owed[name] - size)
                command.credit -= size
                self.write_port()
                return
        # A pipe holds 64 KiB: read on while the command keeps it filled, up to a frame.
        collected = []
        size = 0
        failure = None
        while size < min(CHUNK, command.credit):
            try:
                data = os.read(getattr(command, name), min(CHUNK, command.credit) - size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if command.file:
                    failure = e
                    break
                # A pseudo-terminal's master reads EIO once no process has it open.
                if e.errno != errno.EIO:
                    raise
                data = b''
            if not data:
                if size:
                    break
                self.close_fd(command, name)
                command.owed.pop(name, None)
                return
            collected.append(data)
            size += len(data)
        if size:
            if name in command.owed:
                command.owed[name] = max(0, command.owed[name] - size)
            command.credit -= size
            self.send(command.channel, kind, b''.join(collected))
        if failure is not None:
            self.file_failed(command, failure)
        if size or failure is not None:
            self.write_port()

    def run(self):
        self.hello()
        while True:
            now = time.monotonic()
            timeout = None
            for command in list(self.commands.values()):
                if command.status is None or command.file and command.stdout is not None:
                    # Running, or a file still being read: its end is the file's.
                    continue
                if command.credit <= 0 or any(command.owed.values()):
                    # Blocked by a slow reader or a busy port, not by leftovers: the
                    # command's own output must all be delivered first.
                    command.exited_at = now
                if command.stdout is None and command.stderr is None:
                    self.finish(command, command.status)
                elif now - command.exited_at >= LINGER:
                    self.finish(command, command.status)
                else:
                    left = LINGER - (now - command.exited_at)
                    timeout = left if timeout is None else min(timeout, left)
            poller = select.poll()
            if self.port == self.port_out:
                poller.register(self.port, select.POLLIN | (select.POLLOUT if self.outbuf_size() else 0))
            else:
                poller.register(self.port, select.POLLIN)
                if self.outbuf_size():
                    poller.register(self.port_out, select.POLLOUT)
            poller.register(self.wake_r, select.POLLIN)
            watched = {}
            for command in self.commands.values():
                if len(command.pending) > command.pending_offset and command.stdin is not None:
                    poller.register(command.stdin, select.POLLOUT)
                    watched[command.stdin] = (command, 'stdin', None)
                if command.credit > 0 and self.outbuf_size() < OUTBUF_LIMIT:
                    for name, kind in (('stdout', STDOUT), ('stderr', STDERR)):
                        fd = getattr(command, name)
                        if fd is not None:
                            poller.register(fd, select.POLLIN)
                            watched[fd] = (command, name, kind)
            try:
                events = poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
            except InterruptedError:
                continue
            for fd, event in events:
                if fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                elif fd == self.port or fd == self.port_out:
                    if event & select.POLLOUT:
                        self.write_port()
                    if fd == self.port and event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        if not self.read_port():
                            return
                    elif fd != self.port and event & (select.POLLHUP | select.POLLERR):
                        # Nobody reads the output pipe any more: the host is gone.
                        return
                elif fd in watched:
                    command, name, kind = watched[fd]
                    if self.commands.get(command.channel) is not command:
                        continue
                    if name == 'stdin':
                        if getattr(command, 'stdin') is not None:
                            self.write_stdin(command)
                    elif getattr(command, name) is not None:
                        self.read_output(command, name, kind)
            self.reap()


def main():
    global VERSION
    os.umask(0o022)
    if len(sys.argv) > 1 and sys.argv[1] == '--version':
        if len(sys.argv) < 3:
            sys.stderr.write('usage: debusine-virt-helper [--version VERSION] PORT | --listen SOCKET | --stdio\n')
            return 2
        VERSION = sys.argv[2]
        del sys.argv[1:3]
    port_out = None
    if len(sys.argv) == 2 and sys.argv[1] == '--stdio':
        # Frames on stdin and stdout (`incus exec`); both are moved off 0 and 1 so that
        # nothing else written there can reach the stream, and end of file on stdin ends
        # the helper and its commands.
        port, port_out = os.dup(0), os.dup(1)
        null = os.open('/dev/null', os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
    elif len(sys.argv) == 3 and sys.argv[1] == '--listen':
        import socket
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(sys.argv[2])
        server.listen(1)
        connection, _ = server.accept()
        server.close()
        port = os.dup(connection.fileno())
        connection.close()
    elif len(sys.argv) == 2:
        try:
            os.setsid()
        except OSError:
            pass
        port = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
    else:
        sys.stderr.write('usage: debusine-virt-helper [--version VERSION] PORT | --listen SOCKET | --stdio\n')
        return 2
    helper = Helper(port, port_out)
    try:
        helper.run()
    finally:
        for command in list(helper.commands.values()):
            if command.pid is not None and command.status is None:
                try:
                    os.killpg(command.pid, signal.SIGKILL)
                except OSError:
                    pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
