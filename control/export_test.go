package control

import "bufio"

// Internals the external tests drive directly.
var (
	ParseReply = parseReply
)

// ReadRequest reads one request from r as the Server does.
func ReadRequest(r *bufio.Reader) ([]string, error) { return readRequest(r) }

// AppendRequest encodes a request as the Client does.
func AppendRequest(command string, args ...string) ([]byte, error) {
	return appendRequest(nil, command, args)
}

// ErrLineTooLong and ErrRequestTooLong are the request reader's limits.
var (
	ErrLineTooLong    = errLineTooLong
	ErrRequestTooLong = errRequestTooLong
)
