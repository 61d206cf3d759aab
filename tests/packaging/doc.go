// Package packaging checks what operators install: `make install` and
// `make uninstall` under a DESTDIR, and the Debian package of `make deb`,
// inspected with dpkg-deb and installed and removed with dpkg in a
// throwaway root, so that the machine running the tests is not changed.
package packaging
