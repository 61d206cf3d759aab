package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHandshakeUnknownOptions(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)
	for _, opt := range []Opt{OptPeekExport, OptStartTLS, OptExtendedHeaders, 12, 0, 0xffffffff} {
		c.option(opt, []byte("some data the server must skip"))
		c.expect(opt, RepErrUnsup)
	}
	sess := c.goDisk(ch)
	assert.False(t, sess.Structured)
}

func TestHandshakeStructuredReply(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)

	c.option(OptStructuredReply, []byte{0})
	c.expect(OptStructuredReply, RepErrInvalid)
	c.option(OptSetMetaContext, metaData("disk", MetaContextBaseAllocation))
	c.expect(OptSetMetaContext, RepErrInvalid)

	sess := c.goDisk(ch)
	assert.False(t, sess.Structured, "a refused STRUCTURED_REPLY must not count")
	assert.Zero(t, sess.AllocationContext)
	assert.Zero(t, sess.Flags&FlagSendDF, "DF is meaningless without structured replies")
}

func TestHandshakeListMetaContext(t *testing.T) {
	tests := []struct {
		name    string
		export  string
		queries []string
		want    bool // whether base:allocation is listed
	}{
		{"no queries lists everything", "disk", nil, true},
		{"base namespace wildcard", "disk", []string{"base:"}, true},
		{"exact name", "disk", []string{MetaContextBaseAllocation}, true},
		{"foreign namespace", "disk", []string{"qemu:dirty-bitmap:b0"}, false},
		{"near miss", "disk", []string{"base:allocation2", "base"}, false},
		{"one of several", "other", []string{"x-test:foo", MetaContextBaseAllocation}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := pipe(t)
			ch := startServer(sc, testServerConfig())
			c := newRawClient(t, cc)
			c.greet(FlagCFixedNewstyle)
			c.option(OptStructuredReply, nil)
			c.expect(OptStructuredReply, RepAck)

			c.option(OptListMetaContext, metaData(tt.export, tt.queries...))
			if tt.want {
				d := c.expect(OptListMetaContext, RepMetaContext)
				require.Len(t, d, 4+len(MetaContextBaseAllocation))
				assert.Zero(t, binary.BigEndian.Uint32(d), "LIST replies carry the reserved id 0")
				assert.Equal(t, MetaContextBaseAllocation, string(d[4:]))
			}
			c.expect(OptListMetaContext, RepAck)

			sess := c.goDisk(ch)
			assert.Zero(t, sess.AllocationContext, "LIST must not select anything")
		})
	}
}

func TestHandshakeSetMetaContext(t *testing.T) {
	type set struct {
		export  string
		queries []string
		want    bool // whether the reply selects base:allocation
	}
	tests := []struct {
		name        string
		sets        []set
		wantContext bool
	}{
		{"exact name", []set{{"disk", []string{MetaContextBaseAllocation}, true}}, true},
		{"wildcard ignored", []set{{"disk", []string{"base:"}, false}}, false},
		{"no queries selects nothing", []set{{"disk", nil, false}}, false},
		{"for another export than GO", []set{{"other", []string{MetaContextBaseAllocation}, true}}, false},
		{"a later SET replaces an earlier one", []set{
			{"disk", []string{MetaContextBaseAllocation}, true},
			{"disk", []string{"qemu:dirty-bitmap:b0"}, false},
		}, false},
		{"the last SET names the GO export", []set{
			{"other", []string{MetaContextBaseAllocation}, true},
			{"disk", []string{MetaContextBaseAllocation}, true},
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := pipe(t)
			ch := startServer(sc, testServerConfig())
			c := newRawClient(t, cc)
			c.greet(FlagCFixedNewstyle)
			c.option(OptStructuredReply, nil)
			c.expect(OptStructuredReply, RepAck)

			var id uint32
			for _, s := range tt.sets {
				c.option(OptSetMetaContext, metaData(s.export, s.queries...))
				if s.want {
					d := c.expect(OptSetMetaContext, RepMetaContext)
					require.Len(t, d, 4+len(MetaContextBaseAllocation))
					id = binary.BigEndian.Uint32(d)
					assert.NotZero(t, id, "a selected context needs a usable id")
					assert.Equal(t, MetaContextBaseAllocation, string(d[4:]))
				}
				c.expect(OptSetMetaContext, RepAck)
			}

			sess := c.goDisk(ch)
			if tt.wantContext {
				assert.Equal(t, id, sess.AllocationContext)
			} else {
				assert.Zero(t, sess.AllocationContext)
			}
		})
	}
}

func TestHandshakeMetaContextUnknownExport(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)
	c.option(OptStructuredReply, nil)
	c.expect(OptStructuredReply, RepAck)
	c.option(OptListMetaContext, metaData("missing"))
	c.expect(OptListMetaContext, RepErrUnknown)
	c.goDisk(ch)
}

func TestHandshakeMalformedOptions(t *testing.T) {
	name4097 := make([]byte, MaxStringLen+1)
	tests := []struct {
		name string
		opt  Opt
		data []byte
	}{
		{"INFO without data", OptInfo, nil},
		{"INFO name length beyond the data", OptInfo, []byte{0, 0, 0, 9, 'd', 'i', 's', 'k', 0, 0}},
		{"INFO name over 4096 bytes", OptInfo, append(append([]byte{0, 0, 0x10, 0x01}, name4097...), 0, 0)},
		{"INFO count missing", OptInfo, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k'}},
		{"INFO more requests announced than sent", OptInfo, append(infoData("disk")[:8], 0, 2, 0, 1)},
		{"INFO odd byte of requests", OptInfo, append(infoData("disk", InfoName), 0)},
		{"GO with trailing bytes", OptGo, append(infoData("disk"), 1, 2, 3)},
		{"LIST_META query beyond the data", OptListMetaContext, append(metaData("disk")[:8], 0, 0, 0, 1, 0, 0, 0, 200, 'x')},
		{"LIST_META count missing", OptListMetaContext, []byte{0, 0, 0, 0}},
		{"SET_META trailing bytes", OptSetMetaContext, append(metaData("disk", "base:allocation"), 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := pipe(t)
			ch := startServer(sc, testServerConfig())
			c := newRawClient(t, cc)
			c.greet(FlagCFixedNewstyle)
			c.option(OptStructuredReply, nil)
			c.expect(OptStructuredReply, RepAck)
			c.option(tt.opt, tt.data)
			c.expect(tt.opt, RepErrInvalid)
			// The option's length kept the stream in step: GO still works.
			sess := c.goDisk(ch)
			assert.Equal(t, testDisk, sess.Export)
		})
	}
}

func TestHandshakeOptionTooBig(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)

	// Data that looks like options of its own, so a server that lost count
	// of it would answer those instead.
	var junk bytes.Buffer
	for junk.Len() <= MaxOptionLen {
		junk.Write(optionBytes(OptList, nil))
	}
	c.option(OptInfo, junk.Bytes())
	c.expect(OptInfo, RepErrTooBig)

	sess := c.goDisk(ch)
	assert.Equal(t, testDisk, sess.Export)
}

func TestHandshakeExportNameTooBig(t *testing.T) {
	t.Run("beyond the option limit", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, testServerConfig())
		c := newRawClient(t, cc)
		c.greet(FlagCFixedNewstyle)
		// Only the header: a server that tried to read or skip the name
		// first would wait for bytes that never come.
		b := optionBytes(OptExportName, nil)
		binary.BigEndian.PutUint32(b[12:], MaxOptionLen+1)
		c.write(b)
		var pe *ProtocolError
		assert.ErrorAs(t, waitServer(t, ch).err, &pe)
	})
	t.Run("beyond the string limit", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, testServerConfig())
		c := newRawClient(t, cc)
		c.greet(FlagCFixedNewstyle)
		c.option(OptExportName, bytes.Repeat([]byte("d"), MaxStringLen+1))
		var pe *ProtocolError
		assert.ErrorAs(t, waitServer(t, ch).err, &pe)
	})
}

func TestHandshakeProtocolErrors(t *testing.T) {
	badMagic := optionBytes(OptGo, infoData("disk"))
	badMagic[0] ^= 0xff
	tests := []struct {
		name  string
		flags ClientFlags
		send  []byte
	}{
		{"unknown client flags", FlagCFixedNewstyle | 1<<2, nil},
		{"high client flag", 1 << 31, nil},
		{"non-fixed client sends LIST", 0, optionBytes(OptList, nil)},
		{"non-fixed client sends GO", FlagCNoZeroes, optionBytes(OptGo, infoData("disk"))},
		{"bad option magic", FlagCFixedNewstyle, badMagic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := pipe(t)
			ch := startServer(sc, testServerConfig())
			c := newRawClient(t, cc)
			c.greet(tt.flags)
			if tt.send != nil {
				// The server may hang up before reading all of it.
				_, _ = cc.Write(tt.send)
			}
			var pe *ProtocolError
			assert.ErrorAs(t, waitServer(t, ch).err, &pe)
			_, err := c.r.ReadByte()
			assert.Error(t, err, "no reply may follow a protocol error")
		})
	}
}

func TestHandshakeTooManyOptions(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)
	for range MaxOptions {
		c.option(OptStructuredReply, nil)
		c.expect(OptStructuredReply, RepAck)
	}
	var pe *ProtocolError
	assert.ErrorAs(t, waitServer(t, ch).err, &pe)
}

func TestHandshakeEOF(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)
	c.write(optionBytes(OptGo, nil)[:10])
	cc.Close()
	err := waitServer(t, ch).err
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
}

// scriptedServer answers a client handshake from a fixed script of byte
// strings, one written after each expected option.
func scriptedServer(t *testing.T, greeting []byte, steps []scriptStep) (r *bufio.Reader, done <-chan error, w io.Writer) {
	t.Helper()
	c, s := pipe(t)
	ch := make(chan error, 1)
	go func() {
		ch <- func() error {
			if _, err := s.Write(greeting); err != nil {
				return err
			}
			br := bufio.NewReader(s)
			var flags [4]byte
			if _, err := io.ReadFull(br, flags[:]); err != nil {
				return err
			}
			for _, st := range steps {
				var h [optionHeaderSize]byte
				if _, err := io.ReadFull(br, h[:]); err != nil {
					return err
				}
				if got := Opt(binary.BigEndian.Uint32(h[8:12])); got != st.opt {
					return protocolErrorf("script wanted option %d, got %d", st.opt, got)
				}
				if _, err := br.Discard(int(binary.BigEndian.Uint32(h[12:16]))); err != nil {
					return err
				}
				if _, err := s.Write(st.reply); err != nil {
					return err
				}
			}
			return nil
		}()
	}()
	return bufio.NewReader(c), ch, c
}

type scriptStep struct {
	opt   Opt
	reply []byte
}

func appendOptReply(dst []byte, opt Opt, typ Rep, data []byte) []byte {
	dst = binary.BigEndian.AppendUint64(dst, magicOptReply)
	dst = binary.BigEndian.AppendUint32(dst, uint32(opt))
	dst = binary.BigEndian.AppendUint32(dst, uint32(typ))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(data)))
	return append(dst, data...)
}

func newstyleGreeting(flags HandshakeFlags) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicInitPasswd)
	b = binary.BigEndian.AppendUint64(b, magicIHaveOpt)
	return binary.BigEndian.AppendUint16(b, uint16(flags))
}

func exportReply(size uint64, flags TransmissionFlags, zeroes bool) []byte {
	b := binary.BigEndian.AppendUint64(nil, size)
	b = binary.BigEndian.AppendUint16(b, uint16(flags))
	if zeroes {
		b = append(b, make([]byte, zeroPadSize)...)
	}
	return b
}

func TestClientHandshakeOlderServers(t *testing.T) {
	const size = 1 << 20
	flags := FlagHasFlags | FlagSendFlush
	t.Run("GO unsupported falls back to EXPORT_NAME", func(t *testing.T) {
		r, done, w := scriptedServer(t, newstyleGreeting(FlagFixedNewstyle|FlagNoZeroes), []scriptStep{
			{OptStructuredReply, appendOptReply(nil, OptStructuredReply, RepErrUnsup, nil)},
			{OptGo, appendOptReply(nil, OptGo, RepErrUnsup, nil)},
			{OptExportName, exportReply(size, flags, false)},
		})
		sess, err := clientHandshake(r, w, &ClientOptions{})
		require.NoError(t, err)
		require.NoError(t, <-done)
		assert.Equal(t, uint64(size), sess.Export.Size)
		assert.Equal(t, flags, sess.Flags)
		assert.False(t, sess.Structured)
	})
	t.Run("plain newstyle sends only EXPORT_NAME", func(t *testing.T) {
		r, done, w := scriptedServer(t, newstyleGreeting(0), []scriptStep{
			{OptExportName, exportReply(size, flags, true)},
		})
		sess, err := clientHandshake(r, w, &ClientOptions{ExportName: "x"})
		require.NoError(t, err)
		require.NoError(t, <-done)
		assert.Equal(t, uint64(size), sess.Export.Size)
		assert.Equal(t, "x", sess.Export.Name)
	})
	t.Run("refused meta context leaves block status off", func(t *testing.T) {
		info := binary.BigEndian.AppendUint16(nil, uint16(InfoExport))
		info = binary.BigEndian.AppendUint64(info, size)
		info = binary.BigEndian.AppendUint16(info, uint16(flags))
		r, done, w := scriptedServer(t, newstyleGreeting(FlagFixedNewstyle|FlagNoZeroes), []scriptStep{
			{OptStructuredReply, appendOptReply(nil, OptStructuredReply, RepAck, nil)},
			{OptSetMetaContext, appendOptReply(nil, OptSetMetaContext, RepErrPolicy, []byte("no"))},
			{OptGo, appendOptReply(appendOptReply(nil, OptGo, RepInfo, info), OptGo, RepAck, nil)},
		})
		sess, err := clientHandshake(r, w, &ClientOptions{})
		require.NoError(t, err)
		require.NoError(t, <-done)
		assert.True(t, sess.Structured)
		assert.Zero(t, sess.AllocationContext)
	})
	t.Run("GO acknowledged without export info", func(t *testing.T) {
		r, _, w := scriptedServer(t, newstyleGreeting(FlagFixedNewstyle), []scriptStep{
			{OptGo, appendOptReply(nil, OptGo, RepAck, nil)},
		})
		_, err := clientHandshake(r, w, &ClientOptions{NoStructuredReplies: true})
		var pe *ProtocolError
		assert.ErrorAs(t, err, &pe)
	})
	t.Run("not an NBD server", func(t *testing.T) {
		r, _, w := scriptedServer(t, []byte("SSH-2.0-OpenSSH_9.2p1 Debian\r\n"), nil)
		_, err := clientHandshake(r, w, &ClientOptions{})
		var pe *ProtocolError
		assert.ErrorAs(t, err, &pe)
	})
}
