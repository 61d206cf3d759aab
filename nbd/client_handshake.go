package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// OptionError is a server's error reply to an option during negotiation.
type OptionError struct {
	Opt     Opt
	Rep     Rep
	Message string
}

func (e *OptionError) Error() string {
	msg := fmt.Sprintf("nbd: server refused option %d with reply %#x", e.Opt, uint32(e.Rep))
	if e.Message != "" {
		msg += ": " + e.Message
	}
	return msg
}

// maxOptReplyLen bounds a reply the client will buffer during negotiation.
const maxOptReplyLen = 64 << 10

// clientHandshake negotiates as a client. It detects oldstyle servers from
// the greeting; with newstyle servers it asks for structured replies and
// base:allocation (unless opts say otherwise) and enters transmission with
// GO, falling back to EXPORT_NAME for servers without it.
func clientHandshake(r *bufio.Reader, w io.Writer, opts *ClientOptions) (*Session, error) {
	var b [16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(b[0:8]); m != magicInitPasswd {
		return nil, protocolErrorf("not an NBD server (greeting %#x)", m)
	}
	switch m := binary.BigEndian.Uint64(b[8:16]); m {
	case magicOldstyle:
		return clientOldstyle(r)
	case magicIHaveOpt:
	default:
		return nil, protocolErrorf("unknown greeting magic %#x", m)
	}
	if _, err := io.ReadFull(r, b[:2]); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read handshake flags: %w", err)
	}
	hflags := HandshakeFlags(binary.BigEndian.Uint16(b[:2]))
	var cflags ClientFlags
	if hflags&FlagFixedNewstyle != 0 {
		cflags |= FlagCFixedNewstyle
	}
	if hflags&FlagNoZeroes != 0 {
		cflags |= FlagCNoZeroes
	}
	if _, err := w.Write(binary.BigEndian.AppendUint32(nil, uint32(cflags))); err != nil {
		return nil, fmt.Errorf("nbd: handshake: write client flags: %w", err)
	}
	c := clientNegotiator{r: r, w: w, noZeroes: cflags&FlagCNoZeroes != 0}
	if cflags&FlagCFixedNewstyle == 0 {
		return c.exportName(opts.ExportName)
	}
	sess := &Session{}
	if opts.FenceKey != "" {
		ok, err := c.fence(opts.FenceKey, opts.FenceGen)
		if err != nil {
			return nil, err
		}
		sess.Fenced = ok
	}
	if !opts.NoStructuredReplies {
		ok, err := c.simpleOption(OptStructuredReply, nil)
		if err != nil {
			return nil, err
		}
		sess.Structured = ok
	}
	if sess.Structured && !opts.NoBlockStatus {
		id, err := c.setMetaContext(opts.ExportName)
		if err != nil {
			return nil, err
		}
		sess.AllocationContext = id
	}
	exp, err := c.goExport(opts.ExportName)
	var oe *OptionError
	if errors.As(err, &oe) && oe.Rep == RepErrUnsup {
		// An older server: what it granted so far still holds.
		s, err := c.exportName(opts.ExportName)
		if err != nil {
			return nil, err
		}
		s.Structured = sess.Structured
		s.AllocationContext = sess.AllocationContext
		s.Fenced = sess.Fenced
		return s, nil
	}
	if err != nil {
		return nil, err
	}
	sess.Export = exp
	sess.Flags = exp.Flags
	return sess, nil
}

func clientOldstyle(r *bufio.Reader) (*Session, error) {
	var b [oldstyleGreetingSize - 16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read oldstyle greeting: %w", err)
	}
	size := binary.BigEndian.Uint64(b[0:8])
	flags := TransmissionFlags(binary.BigEndian.Uint32(b[8:12]))
	return &Session{
		Export:   ExportInfo{Size: size, Flags: flags},
		Flags:    flags,
		Oldstyle: true,
	}, nil
}

type clientNegotiator struct {
	r        *bufio.Reader
	w        io.Writer
	noZeroes bool
}

func (c *clientNegotiator) send(opt Opt, data []byte) error {
	buf := make([]byte, 0, optionHeaderSize+len(data))
	buf = binary.BigEndian.AppendUint64(buf, magicIHaveOpt)
	buf = binary.BigEndian.AppendUint32(buf, uint32(opt))
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(data)))
	buf = append(buf, data...)
	if _, err := c.w.Write(buf); err != nil {
		return fmt.Errorf("nbd: handshake: write option %d: %w", opt, err)
	}
	return nil
}

// recv reads one option reply to opt.
func (c *clientNegotiator) recv(opt Opt) (Rep, []byte, error) {
	var h [optReplyHeaderSize]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: handshake: read option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != magicOptReply {
		return 0, nil, protocolErrorf("bad option reply magic %#x", m)
	}
	if got := Opt(binary.BigEndian.Uint32(h[8:12])); got != opt {
		return 0, nil, protocolErrorf("reply for option %d while waiting for %d", got, opt)
	}
	typ := Rep(binary.BigEndian.Uint32(h[12:16]))
	n := binary.BigEndian.Uint32(h[16:20])
	if n > maxOptReplyLen {
		return 0, nil, protocolErrorf("option reply of %d bytes", n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: handshake: read option reply data: %w", err)
	}
	return typ, data, nil
}

// simpleOption sends an option answered by a single ACK; an UNSUP or POLICY
// reply is reported as not granted rather than as an error.
func (c *clientNegotiator) simpleOption(opt Opt, data []byte) (bool, error) {
	if err := c.send(opt, data); err != nil {
		return false, err
	}
	typ, msg, err := c.recv(opt)
	switch {
	case err != nil:
		return false, err
	case typ == RepAck:
		return true, nil
	case typ == RepErrUnsup || typ == RepErrPolicy:
		return false, nil
	case typ.IsError():
		return false, &OptionError{Opt: opt, Rep: typ, Message: string(msg)}
	}
	return false, protocolErrorf("unexpected reply %#x to option %d", uint32(typ), opt)
}

// fence sends OptFence; a server that does not know it says UNSUP.
func (c *clientNegotiator) fence(key string, gen uint64) (bool, error) {
	if len(key) > MaxFenceKey {
		return false, fmt.Errorf("nbd: fence key of %d bytes", len(key))
	}
	d := binary.BigEndian.AppendUint64(nil, gen)
	if err := c.send(OptFence, append(d, key...)); err != nil {
		return false, err
	}
	typ, msg, err := c.recv(OptFence)
	switch {
	case err != nil:
		return false, err
	case typ == RepAck:
		return true, nil
	case typ == RepErrUnsup:
		return false, nil
	case typ.IsError():
		return false, &OptionError{Opt: OptFence, Rep: typ, Message: string(msg)}
	}
	return false, protocolErrorf("unexpected reply %#x to the fence option", uint32(typ))
}

func (c *clientNegotiator) setMetaContext(export string) (uint32, error) {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	d = append(d, export...)
	d = binary.BigEndian.AppendUint32(d, 1)
	d = binary.BigEndian.AppendUint32(d, uint32(len(MetaContextBaseAllocation)))
	d = append(d, MetaContextBaseAllocation...)
	if err := c.send(OptSetMetaContext, d); err != nil {
		return 0, err
	}
	var id uint32
	for {
		typ, data, err := c.recv(OptSetMetaContext)
		if err != nil {
			return 0, err
		}
		switch {
		case typ == RepMetaContext && len(data) >= 4:
			if string(data[4:]) == MetaContextBaseAllocation {
				id = binary.BigEndian.Uint32(data[:4])
			}
		case typ == RepAck:
			return id, nil
		case typ.IsError():
			// Block status is an optimisation; do without it.
			return 0, nil
		default:
			return 0, protocolErrorf("unexpected reply %#x to SET_META_CONTEXT", uint32(typ))
		}
	}
}

func (c *clientNegotiator) goExport(name string) (ExportInfo, error) {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, 1)
	d = binary.BigEndian.AppendUint16(d, uint16(InfoBlockSize))
	if err := c.send(OptGo, d); err != nil {
		return ExportInfo{}, err
	}
	exp := ExportInfo{Name: name}
	haveExport := false
	for {
		typ, data, err := c.recv(OptGo)
		if err != nil {
			return ExportInfo{}, err
		}
		switch {
		case typ == RepInfo && len(data) >= 2:
			switch Info(binary.BigEndian.Uint16(data)) {
			case InfoExport:
				if len(data) != 12 {
					return ExportInfo{}, protocolErrorf("INFO_EXPORT of %d bytes", len(data))
				}
				exp.Size = binary.BigEndian.Uint64(data[2:10])
				exp.Flags = TransmissionFlags(binary.BigEndian.Uint16(data[10:12]))
				haveExport = true
			case InfoBlockSize:
				if len(data) != 14 {
					return ExportInfo{}, protocolErrorf("INFO_BLOCK_SIZE of %d bytes", len(data))
				}
				exp.MinBlock = binary.BigEndian.Uint32(data[2:6])
				exp.PreferredBlock = binary.BigEndian.Uint32(data[6:10])
				exp.MaxBlock = binary.BigEndian.Uint32(data[10:14])
			case InfoDescription:
				exp.Description = string(data[2:])
			}
		case typ == RepAck:
			if !haveExport {
				return ExportInfo{}, protocolErrorf("GO acknowledged without INFO_EXPORT")
			}
			return exp, nil
		case typ.IsError():
			return ExportInfo{}, &OptionError{Opt: OptGo, Rep: typ, Message: string(data)}
		default:
			return ExportInfo{}, protocolErrorf("unexpected reply %#x to GO", uint32(typ))
		}
	}
}

func (c *clientNegotiator) exportName(name string) (*Session, error) {
	if err := c.send(OptExportName, []byte(name)); err != nil {
		return nil, err
	}
	n := 10
	if !c.noZeroes {
		n += zeroPadSize
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read export info (export refused?): %w", err)
	}
	flags := TransmissionFlags(binary.BigEndian.Uint16(b[8:10]))
	return &Session{
		Export: ExportInfo{Name: name, Size: binary.BigEndian.Uint64(b[0:8]), Flags: flags},
		Flags:  flags,
	}, nil
}
