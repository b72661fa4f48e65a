#!/bin/sh
# debusine-virt: runs one command for the autopkgtest auxverb (incus exec ... -- THIS CMD...).
# Gives the command the environment of a root login, and returns as soon as the command
# exits even when it left background processes holding stdout or stderr.
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 253; }
shell=/bin/sh
[ -x /bin/bash ] && shell=/bin/bash
for var in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
    case $var in TERM) ;; *) unset "$var" 2>/dev/null ;; esac
done
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
if command -v perl >/dev/null 2>&1; then
    exec perl -e '
use strict;
use warnings;
$SIG{PIPE} = "IGNORE";
pipe(my $out_r, my $out_w) or die "pipe: $!";
pipe(my $err_r, my $err_w) or die "pipe: $!";
my $pid = fork() // die "fork: $!";
if ($pid == 0) {
    $SIG{PIPE} = "DEFAULT";
    close $out_r; close $err_r;
    open(STDOUT, ">&", $out_w) or exit(253);
    open(STDERR, ">&", $err_w) or exit(253);
    close $out_w; close $err_w;
    { no warnings; exec { $ARGV[0] } @ARGV; }
    print STDERR "$ARGV[0]: $!\n";
    exit($!{ENOENT} ? 127 : 126);
}
close $out_w; close $err_w;
for my $signal (qw(TERM INT HUP QUIT USR1 USR2 ALRM)) {
    $SIG{$signal} = sub { kill $signal, $pid };
}
my $status;
$SIG{CHLD} = sub { };
my %open = (fileno($out_r) => [$out_r, \*STDOUT], fileno($err_r) => [$err_r, \*STDERR]);
sub relay {
    my ($timeout) = @_;
    my $rin = "";
    vec($rin, $_, 1) = 1 for keys %open;
    my $n = select(my $rout = $rin, undef, undef, $timeout);
    return 0 if $n <= 0;
    for my $fd (keys %open) {
        next unless vec($rout, $fd, 1);
        my ($from, $to) = @{$open{$fd}};
        my $got = sysread($from, my $buffer, 65536);
        if (!$got) { delete $open{$fd}; next; }
        my $offset = 0;
        while ($offset < $got) {
            my $written = syswrite($to, $buffer, $got - $offset, $offset);
            if (!defined $written) { last unless $!{EINTR}; next; }
            $offset += $written;
        }
    }
    return 1;
}
while (%open) {
    relay(defined $status ? 0 : 0.5) or (defined $status and last);
    if (!defined $status && waitpid($pid, 1) == $pid) { $status = $?; }
}
waitpid($pid, 0) == $pid and $status = $? unless defined $status;
exit(128 + ($status & 127)) if $status & 127;
my $code = $status >> 8;
exit($code == 255 ? 253 : $code);
' "$@"
fi
"$@"
code=$?
[ $code = 255 ] && code=253
exit $code
