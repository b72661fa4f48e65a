#!/bin/sh
# debusine-virt: runs one command for the autopkgtest auxverb, with the environment of a
# root login.
#
# THIS --login CMD...: through the guest helper (debusine-virt-auxverb SOCKET THIS --login
# CMD...), which does the rest: the environment, then exec.
#
# THIS --framed CMD... (debusine-virt-auxverb --exec N incus exec ... -- THIS --framed CMD...),
# where the instance has no guest helper: returns as soon as the command exits even when it
# left background processes holding stdout or stderr.
#
# stdin and stdout carry frames of the guest channel (9-byte header: channel, kind, length,
# big-endian). stdout and stderr of the command come as frames on stdout, then an exit frame;
# the wrapper then stays until its stdin ends. incus exec can lose the last output of a command
# that exits right after writing it (several execs at once on a busy host): the host closes our
# stdin only once it has the exit frame, so nothing it still needs is in flight when this
# process ends. Perl (perl-base is essential in Debian) does the framing.
mode=${1-}
if { [ "$mode" != --framed ] && [ "$mode" != --login ]; } || [ $# -lt 2 ]; then
    echo "usage: $0 --framed|--login COMMAND [ARG...]" >&2
    exit 253
fi
shift
shell=/bin/sh
[ -x /bin/bash ] && shell=/bin/bash
if [ "$mode" = --login ]; then
    # Where incus exec starts a command (the helper starts it in /).
    cd /root 2>/dev/null || cd /
    # The helper's environment is its few variables (and TERM on a terminal): the rest of
    # them are set below, so only LANG goes, and what this shell exported itself (PWD, and
    # OLDPWD after the cd). No env and sed to run on every command.
    unset LANG PWD OLDPWD
else
    for var in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
        case $var in TERM) ;; *) unset "$var" 2>/dev/null ;; esac
    done
fi
export HOME=/root USER=root LOGNAME=root SHELL=$shell
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
set -a
# The instance's own files, whatever they hold:
# shellcheck source=/dev/null
[ -r /etc/environment ] && . /etc/environment >/dev/null 2>&1
# shellcheck source=/dev/null
[ -r /etc/default/locale ] && . /etc/default/locale >/dev/null 2>&1
# shellcheck source=/dev/null
[ -r /etc/profile ] && . /etc/profile >/dev/null 2>&1
set +a
unset PS1
if [ "$mode" = --login ]; then
    # As the framed path says it, not with this script's name and line.
    command -v "$1" >/dev/null 2>&1 || { echo "$1: No such file or directory" >&2; exit 127; }
    exec "$@"
fi
command -v perl >/dev/null 2>&1 || { echo "debusine-virt: the testbed has no perl (perl-base)" >&2; exit 253; }
exec perl -e '
use strict;
use warnings;
$SIG{PIPE} = "IGNORE";
pipe(my $in_r, my $in_w) or die "pipe: $!";
pipe(my $out_r, my $out_w) or die "pipe: $!";
pipe(my $err_r, my $err_w) or die "pipe: $!";
my $pid = fork() // die "fork: $!";
if ($pid == 0) {
    $SIG{PIPE} = "DEFAULT";
    close $in_w; close $out_r; close $err_r;
    open(STDIN, "<&", $in_r) or exit(253);
    open(STDOUT, ">&", $out_w) or exit(253);
    open(STDERR, ">&", $err_w) or exit(253);
    close $in_r; close $out_w; close $err_w;
    { no warnings; exec { $ARGV[0] } @ARGV; }
    print STDERR "$ARGV[0]: $!\n";
    exit($!{ENOENT} ? 127 : 126);
}
close $in_r; close $out_w; close $err_w;
for my $signal (qw(TERM INT HUP QUIT USR1 USR2 ALRM)) {
    $SIG{$signal} = sub { kill $signal, $pid };
}
$SIG{CHLD} = sub { };
sub frame {
    my ($kind, $data) = @_;
    my $bytes = pack("NCN", 0, $kind, length $data) . $data;
    my $offset = 0;
    while ($offset < length $bytes) {
        my $written = syswrite(STDOUT, $bytes, length($bytes) - $offset, $offset);
        if (!defined $written) {
            next if $!{EINTR};
            kill "TERM", $pid;
            exit(253);
        }
        $offset += $written;
    }
}
my $out_fd = fileno($out_r);
my %open = ($out_fd => [$out_r, 0x11], fileno($err_r) => [$err_r, 0x12]);
my ($host, $pending, $stdin_done, $host_done, $status) = ("", "", 0, 0, undef);
sub close_stdin { close $in_w if defined $in_w; $in_w = undef; $pending = ""; }
# Until the command has ended and its output is drained; stdin goes on flowing to a command
# that closed both of its outputs.
while (%open || !defined $status) {
    my ($rin, $win) = ("", "");
    vec($rin, $_, 1) = 1 for keys %open;
    if (!defined $status) {
        vec($rin, 0, 1) = 1 unless $host_done || length($pending) >= 1048576;
        vec($win, fileno($in_w), 1) = 1 if defined $in_w && length $pending;
    }
    my $n = select(my $rout = $rin, my $wout = $win, undef, defined $status ? 0 : 0.5);
    if ($n > 0) {
        for my $fd (keys %open) {
            next unless vec($rout, $fd, 1);
            my ($from, $kind) = @{$open{$fd}};
            my $got = sysread($from, my $buffer, 65536);
            if (!defined $got) { next if $!{EINTR}; }
            if (!$got) { delete $open{$fd}; next; }
            frame($kind, $buffer);
        }
        if (!defined $status && vec($rout, 0, 1)) {
            my $got = sysread(STDIN, $host, 65536, length $host);
            if (defined $got && $got == 0 || !defined $got && !$!{EINTR}) {
                # The host went away before the end: so does the command.
                $host_done = 1;
                close_stdin();
                kill "TERM", $pid;
            }
            while (length($host) >= 9) {
                my ($channel, $kind, $length) = unpack("NCN", $host);
                last if length($host) < 9 + $length;
                my $payload = substr($host, 9, $length);
                substr($host, 0, 9 + $length) = "";
                if ($kind == 0x02) { $pending .= $payload if defined $in_w; }
                elsif ($kind == 0x03) { $stdin_done = 1; }
                elsif ($kind == 0x04 && $payload =~ /^([0-9]{1,2})$/) {
                    if ($1 == 13) {
                        # The reader on the host went away: as with a real pipe, the next write
                        # of the command to stdout fails (SIGPIPE, or EPIPE where it ignores that);
                        # a stdout already ended has nobody to tell.
                        if ($open{$out_fd}) {
                            close $out_r;
                            delete $open{$out_fd};
                        }
                    } else {
                        kill $1, $pid;
                    }
                }
            }
        }
        if (defined $in_w && length $pending && vec($wout, fileno($in_w), 1)) {
            # At most PIPE_BUF while the pipe has room: such a write never blocks.
            for (1 .. 64) {
                my $written = syswrite($in_w, $pending, 4096);
                if (!defined $written) { close_stdin() unless $!{EINTR} || $!{EAGAIN}; last; }
                substr($pending, 0, $written) = "";
                last unless length $pending;
                my $room = "";
                vec($room, fileno($in_w), 1) = 1;
                last unless select(undef, $room, undef, 0) > 0;
            }
        }
        close_stdin() if $stdin_done && defined $in_w && !length $pending;
    } elsif ($n == 0 && defined $status) {
        last;
    }
    if (!defined $status && waitpid($pid, 1) == $pid) {
        $status = $?;
        close_stdin();
        # Reaped: its pid may be reused.
        $SIG{$_} = "IGNORE" for qw(TERM INT HUP QUIT USR1 USR2 ALRM);
    }
}
close $_->[0] for values %open;
frame(0x13, $status & 127 ? "signal " . ($status & 127) : "code " . ($status >> 8));
# Stay, stdout still open, until the host has the exit frame and closes stdin (or a minute has passed).
my $until = time + 60;
while (!$host_done && time < $until) {
    my $rin = "";
    vec($rin, 0, 1) = 1;
    next unless select(my $rout = $rin, undef, undef, 1) > 0;
    my $got = sysread(STDIN, my $buffer, 65536);
    $host_done = 1 if defined $got && $got == 0 || !defined $got && !$!{EINTR};
}
exit 0;
' -- "$@"
