// Package control speaks the control-socket conversation of the C flexnbd,
// both the server side that a running serve or listen instance offers and
// the client side that the status, acl, break and mirror-speed modes use.
//
// # Conversation
//
// The socket is a Unix stream socket that only its owner may use (mode
// 0600). A client connects and writes a command and its arguments, one per
// line ending in '\n', then an empty line; the end of its input counts as
// the empty line. The server answers with exactly one line, "CODE: message",
// and closes the connection. Code 0 is success. The command line tools
// print the message to standard output on code 0 and to standard error
// otherwise, and exit with the code.
//
//	status                 -> 0: pid=N size=N is_mirroring=B clients_allowed=B num_clients=N has_control=B ...
//	acl [ENTRY...]         -> 0: updated | 1: bad spec: ENTRY
//	mirror IP PORT [ACTION [BIND [MAX_BPS]]]
//	                       -> 0: Mirror started | 1: reason
//	mirror_max_bps N       -> 0: updated | 1: Not currently mirroring | 1: Bad format
//	break                  -> 0: mirror stopped | 1: not mirroring | 1: mirror completed
//	(no command)           -> 9: missing command
//	(anything else)        -> 10: unknown command
//
// The status line lists the C flexnbd's fields in its order, each as
// key=value followed by a space, the migration fields only while a mirror
// runs; the fields this implementation adds (uptime and the server's
// counters) come after them, so that scripts written for the C tool read
// the same prefix. ParseFields and FieldsJSON turn a status line, from
// either implementation, into typed JSON.
//
// # Serving
//
// Listen creates the socket file; Server answers on it. Each conversation
// runs on its own goroutine, so a slow command (a mirror still connecting
// to its destination) never delays status. Lines are bounded and each
// connection has deadlines for reading its request and writing its reply,
// so a silent or flooding peer is answered with an error and dropped
// without holding up anyone else. What each command does is up to the
// Handler: the package knows the conversation, not the server or the
// mirror behind it.
//
// BUG(control): The socket's permissions are its only access control; the
// peer's credentials (SO_PEERCRED) are not checked.
//
// BUG(control): A stale socket file is told from a live one by connecting
// to it: only a refused connection counts as stale. A live instance whose
// backlog is full makes Listen fail rather than guess, and the probe shows
// up in the live instance's log as a conversation without a command.
//
// BUG(control): Replacing the socket file is not atomic with respect to
// another process starting on the same path at the same moment: the one
// that renames last owns the path.
package control
