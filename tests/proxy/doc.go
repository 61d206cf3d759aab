// Package proxy tests flexnbd proxy with real processes: servers killed
// and restarted behind it, a server that appears after the proxy, real
// clients (fio, qemu-io, nbdinfo, nbdcopy) through it, over TCP and a Unix
// socket.
package proxy
