package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// ExportInfo describes one export as the handshake presents it.
type ExportInfo struct {
	Name        string
	Description string
	Size        uint64
	// Flags are the export's transmission flags. The handshake adds
	// FlagSendDF by itself when structured replies were negotiated.
	Flags TransmissionFlags
	// Block size constraints for NBD_INFO_BLOCK_SIZE; zero values are
	// replaced by the spec's defaults (1, 4096, DefaultMaxPayload).
	MinBlock, PreferredBlock, MaxBlock uint32
}

func (e *ExportInfo) blockSizes() (min, pref, max uint32) {
	min, pref, max = e.MinBlock, e.PreferredBlock, e.MaxBlock
	if min == 0 {
		min = 1
	}
	if pref == 0 {
		pref = 4096
	}
	if max == 0 {
		max = DefaultMaxPayload
	}
	return min, pref, max
}

// ServerConfig drives the server side of a handshake.
type ServerConfig struct {
	// Oldstyle sends the oldstyle greeting for the default export ("")
	// instead of negotiating: the C flexnbd's wire format.
	Oldstyle bool
	// Lookup resolves an export name. An error refuses the export: with
	// the reply and message of an *OptionError, otherwise with
	// NBD_REP_ERR_UNKNOWN and the error's text, for INFO and GO; by
	// closing the connection for EXPORT_NAME (which cannot report errors).
	Lookup func(name string) (ExportInfo, error)
	// List returns the exports NBD_OPT_LIST announces.
	List func() []ExportInfo
	// Closing, if set and true, makes every option but ABORT fail with
	// NBD_REP_ERR_SHUTDOWN: the server is stopping.
	Closing func() bool
	// Fence, if set, accepts OptFence: an error refuses it with
	// NBD_REP_ERR_POLICY and the error's text. Without it the option is
	// unsupported.
	Fence func(key string, gen uint64) error
}

// Session is what a successful handshake agreed on.
type Session struct {
	Export ExportInfo
	// Flags are the transmission flags as the client received them.
	Flags      TransmissionFlags
	Oldstyle   bool
	Structured bool
	// AllocationContext is the id of base:allocation if the client selected
	// it for this export, else 0: then BLOCK_STATUS is an error.
	AllocationContext uint32
	// FenceKey and FenceGen are what the client sent with OptFence and the
	// server accepted ("" without it); on the client side Fenced says the
	// server accepted it.
	FenceKey string
	FenceGen uint64
	Fenced   bool
}

// ErrAborted is returned by ServerHandshake when the client ended
// negotiation with NBD_OPT_ABORT: a clean end, not a failure.
var ErrAborted = errors.New("nbd: client aborted the handshake")

// allocationContextID is the id handed out for base:allocation. Any nonzero
// value works; a fixed one makes traces easier to read.
const allocationContextID = 1

// ServerHandshake performs the server side of a handshake on a connection
// that has just been accepted. r should be the buffered reader that will also
// read the transmission phase, so that nothing read ahead is lost. Deadlines
// are the caller's business. The connection must be closed on any error.
func ServerHandshake(r *bufio.Reader, w io.Writer, cfg *ServerConfig) (*Session, error) {
	if cfg.Oldstyle {
		return serverOldstyle(w, cfg)
	}
	hs := serverHandshake{r: r, w: w, cfg: cfg}
	return hs.run()
}

func serverOldstyle(w io.Writer, cfg *ServerConfig) (*Session, error) {
	exp, err := cfg.Lookup("")
	if err != nil {
		return nil, fmt.Errorf("nbd: handshake: default export: %w", err)
	}
	flags := exp.Flags | FlagHasFlags
	buf := make([]byte, 0, oldstyleGreetingSize)
	buf = binary.BigEndian.AppendUint64(buf, magicInitPasswd)
	buf = binary.BigEndian.AppendUint64(buf, magicOldstyle)
	buf = binary.BigEndian.AppendUint64(buf, exp.Size)
	buf = binary.BigEndian.AppendUint32(buf, uint32(flags))
	buf = append(buf, make([]byte, zeroPadSize)...)
	if _, err := w.Write(buf); err != nil {
		return nil, fmt.Errorf("nbd: handshake: write oldstyle greeting: %w", err)
	}
	return &Session{Export: exp, Flags: flags, Oldstyle: true}, nil
}

type serverHandshake struct {
	r   *bufio.Reader
	w   io.Writer
	cfg *ServerConfig

	clientFlags ClientFlags
	structured  bool
	// metaExport is the export name the last SET_META_CONTEXT named, and
	// metaSelected whether it selected base:allocation.
	metaExport   string
	metaSelected bool
	// fenceKey and fenceGen are an accepted OptFence.
	fenceKey string
	fenceGen uint64
	scratch  []byte
}

func (h *serverHandshake) run() (*Session, error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:8], magicInitPasswd)
	binary.BigEndian.PutUint64(b[8:16], magicIHaveOpt)
	binary.BigEndian.PutUint16(b[16:18], uint16(FlagFixedNewstyle|FlagNoZeroes))
	if _, err := h.w.Write(b[:]); err != nil {
		return nil, fmt.Errorf("nbd: handshake: write greeting: %w", err)
	}
	if _, err := io.ReadFull(h.r, b[:4]); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read client flags: %w", err)
	}
	h.clientFlags = ClientFlags(binary.BigEndian.Uint32(b[:4]))
	if h.clientFlags&^(FlagCFixedNewstyle|FlagCNoZeroes) != 0 {
		return nil, protocolErrorf("unknown client flags %#x", uint32(h.clientFlags))
	}
	for i := 0; i < MaxOptions; i++ {
		sess, err := h.option()
		if err != nil || sess != nil {
			return sess, err
		}
	}
	return nil, protocolErrorf("more than %d options", MaxOptions)
}

// option reads and answers one option. It returns a session when the
// option entered the transmission phase.
func (h *serverHandshake) option() (*Session, error) {
	var hdr [optionHeaderSize]byte
	if _, err := io.ReadFull(h.r, hdr[:]); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read option: %w", err)
	}
	if m := binary.BigEndian.Uint64(hdr[0:8]); m != magicIHaveOpt {
		return nil, protocolErrorf("bad option magic %#x", m)
	}
	opt := Opt(binary.BigEndian.Uint32(hdr[8:12]))
	length := binary.BigEndian.Uint32(hdr[12:16])

	// A client that did not ask for fixed newstyle cannot parse option
	// replies; EXPORT_NAME is the only thing it may send.
	if h.clientFlags&FlagCFixedNewstyle == 0 && opt != OptExportName {
		return nil, protocolErrorf("option %d from a non-fixed-newstyle client", opt)
	}
	if length > MaxOptionLen {
		if opt == OptExportName {
			return nil, protocolErrorf("export name of %d bytes", length)
		}
		if err := h.discard(length); err != nil {
			return nil, err
		}
		return nil, h.reply(opt, RepErrTooBig, "option data too long")
	}
	data, err := h.readData(length)
	if err != nil {
		return nil, err
	}
	if opt != OptAbort && opt != OptExportName && h.cfg.Closing != nil && h.cfg.Closing() {
		return nil, h.reply(opt, RepErrShutdown, "server is shutting down")
	}

	switch opt {
	case OptExportName:
		return h.exportName(data)
	case OptAbort:
		// The client may already have gone; a failed ACK changes nothing.
		_ = h.reply(opt, RepAck, "")
		return nil, ErrAborted
	case OptList:
		return nil, h.list(data)
	case OptInfo, OptGo:
		return h.infoOrGo(opt, data)
	case OptStructuredReply:
		if len(data) != 0 {
			return nil, h.reply(opt, RepErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		h.structured = true
		return nil, h.reply(opt, RepAck, "")
	case OptListMetaContext, OptSetMetaContext:
		return nil, h.metaContext(opt, data)
	case OptFence:
		if h.cfg.Fence == nil {
			break
		}
		return nil, h.fence(data)
	}
	return nil, h.reply(opt, RepErrUnsup, "option not supported")
}

func (h *serverHandshake) discard(n uint32) error {
	if _, err := h.r.Discard(int(n)); err != nil {
		return fmt.Errorf("nbd: handshake: skip option data: %w", err)
	}
	return nil
}

func (h *serverHandshake) readData(n uint32) ([]byte, error) {
	if cap(h.scratch) < int(n) {
		h.scratch = make([]byte, n)
	}
	data := h.scratch[:n]
	if _, err := io.ReadFull(h.r, data); err != nil {
		return nil, fmt.Errorf("nbd: handshake: read option data: %w", err)
	}
	return data, nil
}

// reply sends one option reply; msg is the payload of an error reply,
// cut to the spec's string limit since it may quote what the client sent.
func (h *serverHandshake) reply(opt Opt, typ Rep, msg string) error {
	if len(msg) > MaxStringLen {
		msg = msg[:MaxStringLen]
	}
	return h.replyData(opt, typ, []byte(msg))
}

func (h *serverHandshake) replyData(opt Opt, typ Rep, data []byte) error {
	buf := make([]byte, 0, optReplyHeaderSize+len(data))
	buf = binary.BigEndian.AppendUint64(buf, magicOptReply)
	buf = binary.BigEndian.AppendUint32(buf, uint32(opt))
	buf = binary.BigEndian.AppendUint32(buf, uint32(typ))
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(data)))
	buf = append(buf, data...)
	if _, err := h.w.Write(buf); err != nil {
		return fmt.Errorf("nbd: handshake: write option reply: %w", err)
	}
	return nil
}

func (h *serverHandshake) exportName(data []byte) (*Session, error) {
	if len(data) > MaxStringLen {
		return nil, protocolErrorf("export name of %d bytes", len(data))
	}
	exp, err := h.cfg.Lookup(string(data))
	if err != nil {
		return nil, fmt.Errorf("nbd: handshake: export %q: %w", data, err)
	}
	sess := h.session(exp, string(data))
	buf := make([]byte, 0, 10+zeroPadSize)
	buf = binary.BigEndian.AppendUint64(buf, exp.Size)
	buf = binary.BigEndian.AppendUint16(buf, uint16(sess.Flags))
	if h.clientFlags&FlagCNoZeroes == 0 {
		buf = append(buf, make([]byte, zeroPadSize)...)
	}
	if _, err := h.w.Write(buf); err != nil {
		return nil, fmt.Errorf("nbd: handshake: write export info: %w", err)
	}
	return sess, nil
}

// fence answers OptFence.
func (h *serverHandshake) fence(data []byte) error {
	if len(data) < 9 || len(data) > 8+MaxFenceKey {
		return h.reply(OptFence, RepErrInvalid, "fence: a generation and a key of 1-64 bytes")
	}
	gen, key := binary.BigEndian.Uint64(data[:8]), string(data[8:])
	if err := h.cfg.Fence(key, gen); err != nil {
		return h.reply(OptFence, RepErrPolicy, err.Error())
	}
	h.fenceKey, h.fenceGen = key, gen
	return h.reply(OptFence, RepAck, "")
}

func (h *serverHandshake) session(exp ExportInfo, name string) *Session {
	s := &Session{Export: exp, Structured: h.structured, Flags: exp.Flags | FlagHasFlags,
		FenceKey: h.fenceKey, FenceGen: h.fenceGen}
	if h.structured {
		s.Flags |= FlagSendDF
	} else {
		s.Flags &^= FlagSendDF
	}
	if h.structured && h.metaSelected && h.metaExport == name {
		s.AllocationContext = allocationContextID
	}
	return s
}

func (h *serverHandshake) list(data []byte) error {
	if len(data) != 0 {
		return h.reply(OptList, RepErrInvalid, "LIST takes no data")
	}
	if h.cfg.List != nil {
		for _, e := range h.cfg.List() {
			d := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			d = append(d, e.Name...)
			d = append(d, e.Description...)
			if err := h.replyData(OptList, RepServer, d); err != nil {
				return err
			}
		}
	}
	return h.reply(OptList, RepAck, "")
}

// optReader walks an option's data with bounds checks; any overrun sets bad.
type optReader struct {
	b   []byte
	bad bool
}

func (o *optReader) u16() uint16 {
	if len(o.b) < 2 {
		o.bad = true
		return 0
	}
	v := binary.BigEndian.Uint16(o.b)
	o.b = o.b[2:]
	return v
}

func (o *optReader) u32() uint32 {
	if len(o.b) < 4 {
		o.bad = true
		return 0
	}
	v := binary.BigEndian.Uint32(o.b)
	o.b = o.b[4:]
	return v
}

// str reads a u32-length-prefixed string bounded by MaxStringLen.
func (o *optReader) str() string {
	n := o.u32()
	if o.bad || n > MaxStringLen || int(n) > len(o.b) {
		o.bad = true
		return ""
	}
	s := string(o.b[:n])
	o.b = o.b[n:]
	return s
}

func (h *serverHandshake) infoOrGo(opt Opt, data []byte) (*Session, error) {
	o := optReader{b: data}
	name := o.str()
	n := o.u16()
	var wantName, wantDescription bool
	for i := 0; i < int(n) && !o.bad; i++ {
		switch Info(o.u16()) {
		case InfoName:
			wantName = true
		case InfoDescription:
			wantDescription = true
		}
	}
	if o.bad || len(o.b) != 0 {
		return nil, h.reply(opt, RepErrInvalid, "malformed INFO/GO request")
	}
	exp, err := h.cfg.Lookup(name)
	if err != nil {
		var oe *OptionError
		if errors.As(err, &oe) && oe.Rep.IsError() {
			return nil, h.reply(opt, oe.Rep, oe.Message)
		}
		return nil, h.reply(opt, RepErrUnknown, err.Error())
	}
	sess := h.session(exp, name)

	info := binary.BigEndian.AppendUint16(nil, uint16(InfoExport))
	info = binary.BigEndian.AppendUint64(info, exp.Size)
	info = binary.BigEndian.AppendUint16(info, uint16(sess.Flags))
	if err := h.replyData(opt, RepInfo, info); err != nil {
		return nil, err
	}
	// Sent whether asked or not: clients ignore info they did not request,
	// and those that understand it learn the 32 MiB request limit.
	min, pref, max := exp.blockSizes()
	info = binary.BigEndian.AppendUint16(info[:0], uint16(InfoBlockSize))
	info = binary.BigEndian.AppendUint32(info, min)
	info = binary.BigEndian.AppendUint32(info, pref)
	info = binary.BigEndian.AppendUint32(info, max)
	if err := h.replyData(opt, RepInfo, info); err != nil {
		return nil, err
	}
	if wantName {
		info = binary.BigEndian.AppendUint16(info[:0], uint16(InfoName))
		info = append(info, exp.Name...)
		if err := h.replyData(opt, RepInfo, info); err != nil {
			return nil, err
		}
	}
	if wantDescription && exp.Description != "" {
		info = binary.BigEndian.AppendUint16(info[:0], uint16(InfoDescription))
		info = append(info, exp.Description...)
		if err := h.replyData(opt, RepInfo, info); err != nil {
			return nil, err
		}
	}
	if err := h.reply(opt, RepAck, ""); err != nil {
		return nil, err
	}
	if opt == OptGo {
		return sess, nil
	}
	return nil, nil
}

func (h *serverHandshake) metaContext(opt Opt, data []byte) error {
	set := opt == OptSetMetaContext
	if set {
		// A SET replaces the selection even when it fails.
		h.metaSelected = false
		h.metaExport = ""
	}
	if !h.structured && set {
		return h.reply(opt, RepErrInvalid, "structured replies must be negotiated first")
	}
	o := optReader{b: data}
	name := o.str()
	n := o.u32()
	var queries []string
	for i := uint32(0); i < n && !o.bad; i++ {
		queries = append(queries, o.str())
	}
	if o.bad || len(o.b) != 0 {
		return h.reply(opt, RepErrInvalid, "malformed meta context request")
	}
	if _, err := h.cfg.Lookup(name); err != nil {
		return h.reply(opt, RepErrUnknown, err.Error())
	}
	match := false
	if !set && n == 0 {
		match = true // an empty LIST asks for everything
	}
	for _, q := range queries {
		switch q {
		case MetaContextBaseAllocation:
			match = true
		case "base:":
			// A wildcard for LIST; SET must ignore it.
			match = match || !set
		}
	}
	if match {
		var id uint32 // LIST replies carry the reserved id 0
		if set {
			id = allocationContextID
			h.metaSelected = true
			h.metaExport = name
		}
		d := binary.BigEndian.AppendUint32(nil, id)
		d = append(d, MetaContextBaseAllocation...)
		if err := h.replyData(opt, RepMetaContext, d); err != nil {
			return err
		}
	}
	return h.reply(opt, RepAck, "")
}
