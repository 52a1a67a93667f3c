# A hostile guest, for tests and `make bench`: run in the guest through mvm's agent (as
# `sh -c`), it kills the agent (and its supervisor, so that init does not restart it), then
# writes /dev/zero into the agent's virtio-serial port and /dev/urandom into the serial
# console, without end. Prints `flooding /dev/vport…` before the flood starts (1 s later).
port=
for d in /sys/class/virtio-ports/*; do read -r n <"$d/name"; [ "$n" = mvm.agent ] && port=/dev/${d##*/}; done
setsid sh -c '
port=$1
sleep 1
for p in /proc/[0-9]*; do
	a=$(tr "\0" " " <"$p/cmdline" 2>/dev/null)
	case $a in "/mvm/busybox sh /mvm/agent"*) read -r _ _ _ pp _ <"$p/stat"; kill -TERM "$pp" ;; esac
done
for p in /proc/[0-9]*; do
	[ "${p#/proc/}" = $$ ] && continue
	ls -l "$p/fd" 2>/dev/null | grep -q "$port" && kill -KILL "${p#/proc/}"
done
cat /dev/urandom >/dev/ttyS0 &
exec cat /dev/zero >"$port"
' flood "$port" </dev/null >/dev/null 2>&1 &
echo "flooding $port"
