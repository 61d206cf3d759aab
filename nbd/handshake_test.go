package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testTimeout bounds every wait in these tests, so a handshake that stops
// talking fails the test instead of hanging it.
const testTimeout = 10 * time.Second

var (
	testDisk  = ExportInfo{Name: "disk", Description: "the test disk", Size: 1 << 30, Flags: FlagSendFlush | FlagSendFUA | FlagSendTrim}
	testOther = ExportInfo{Name: "other", Size: 8192, Flags: FlagReadOnly}
)

func testServerConfig() *ServerConfig {
	return &ServerConfig{
		Lookup: func(name string) (ExportInfo, error) {
			switch name {
			case "", "disk":
				return testDisk, nil
			case "other":
				return testOther, nil
			}
			return ExportInfo{}, fmt.Errorf("no export named %q", name)
		},
		List: func() []ExportInfo { return []ExportInfo{testDisk, testOther} },
	}
}

// pipe returns the two ends of an in-memory connection, both with a
// deadline, closed when the test ends.
func pipe(t *testing.T) (client, server net.Conn) {
	t.Helper()
	client, server = net.Pipe()
	bound(t, client, server)
	return client, server
}

// bound gives both ends of a test connection a deadline, so a bug fails the
// test instead of hanging it, and closes them when it ends.
func bound(t *testing.T, client, server net.Conn) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	require.NoError(t, client.SetDeadline(deadline))
	require.NoError(t, server.SetDeadline(deadline))
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
}

type handshakeResult struct {
	sess *Session
	err  error
}

// startServer runs ServerHandshake on conn and, like a real server, closes
// the connection when it fails.
func startServer(conn net.Conn, cfg *ServerConfig) <-chan handshakeResult {
	ch := make(chan handshakeResult, 1)
	go func() {
		sess, err := ServerHandshake(bufio.NewReader(conn), conn, cfg)
		if err != nil {
			conn.Close()
		}
		ch <- handshakeResult{sess, err}
	}()
	return ch
}

func waitServer(t *testing.T, ch <-chan handshakeResult) handshakeResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(testTimeout):
		t.Fatal("server handshake did not finish")
		return handshakeResult{}
	}
}

// rawClient speaks the client side byte by byte, so tests can send what
// our own client never would.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func newRawClient(t *testing.T, conn net.Conn) *rawClient {
	return &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// greet reads the newstyle greeting and answers it with flags.
func (c *rawClient) greet(flags ClientFlags) {
	c.t.Helper()
	var b [18]byte
	_, err := io.ReadFull(c.r, b[:])
	require.NoError(c.t, err)
	require.Equal(c.t, magicInitPasswd, binary.BigEndian.Uint64(b[0:8]))
	require.Equal(c.t, magicIHaveOpt, binary.BigEndian.Uint64(b[8:16]))
	assert.Equal(c.t, FlagFixedNewstyle|FlagNoZeroes, HandshakeFlags(binary.BigEndian.Uint16(b[16:18])))
	c.write(binary.BigEndian.AppendUint32(nil, uint32(flags)))
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	_, err := c.conn.Write(b)
	require.NoError(c.t, err)
}

func optionBytes(opt Opt, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, uint32(opt))
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (c *rawClient) option(opt Opt, data []byte) {
	c.t.Helper()
	c.write(optionBytes(opt, data))
}

type optReply struct {
	opt  Opt
	typ  Rep
	data []byte
}

func (c *rawClient) reply() optReply {
	c.t.Helper()
	var h [optReplyHeaderSize]byte
	_, err := io.ReadFull(c.r, h[:])
	require.NoError(c.t, err)
	require.Equal(c.t, magicOptReply, binary.BigEndian.Uint64(h[0:8]), "option reply magic")
	r := optReply{
		opt:  Opt(binary.BigEndian.Uint32(h[8:12])),
		typ:  Rep(binary.BigEndian.Uint32(h[12:16])),
		data: make([]byte, binary.BigEndian.Uint32(h[16:20])),
	}
	_, err = io.ReadFull(c.r, r.data)
	require.NoError(c.t, err)
	return r
}

// expect reads one reply and checks that it answers opt with typ.
func (c *rawClient) expect(opt Opt, typ Rep) []byte {
	c.t.Helper()
	r := c.reply()
	require.Equal(c.t, opt, r.opt, "reply is for option %d", r.opt)
	require.Equal(c.t, typ, r.typ, "reply type %#x, data %q", uint32(r.typ), r.data)
	return r.data
}

// infos reads the replies to INFO or GO up to the ACK, keyed by info type.
func (c *rawClient) infos(opt Opt) map[Info][]byte {
	c.t.Helper()
	got := map[Info][]byte{}
	for range 16 {
		r := c.reply()
		require.Equal(c.t, opt, r.opt)
		if r.typ == RepAck {
			return got
		}
		require.Equal(c.t, RepInfo, r.typ, "reply type %#x, data %q", uint32(r.typ), r.data)
		require.GreaterOrEqual(c.t, len(r.data), 2)
		got[Info(binary.BigEndian.Uint16(r.data))] = r.data[2:]
	}
	c.t.Fatal("no ACK after 16 replies")
	return nil
}

// infoData is the payload of INFO and GO.
func infoData(name string, infos ...Info) []byte {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, uint16(len(infos)))
	for _, i := range infos {
		d = binary.BigEndian.AppendUint16(d, uint16(i))
	}
	return d
}

// metaData is the payload of LIST_META_CONTEXT and SET_META_CONTEXT.
func metaData(name string, queries ...string) []byte {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint32(d, uint32(len(queries)))
	for _, q := range queries {
		d = binary.BigEndian.AppendUint32(d, uint32(len(q)))
		d = append(d, q...)
	}
	return d
}

// goDisk enters transmission for "disk" and returns the server's session.
func (c *rawClient) goDisk(ch <-chan handshakeResult) *Session {
	c.t.Helper()
	c.option(OptGo, infoData("disk"))
	got := c.infos(OptGo)
	require.Contains(c.t, got, InfoExport)
	r := waitServer(c.t, ch)
	require.NoError(c.t, r.err)
	return r.sess
}

func TestHandshakeClientServer(t *testing.T) {
	tests := []struct {
		name           string
		opts           ClientOptions
		wantStructured bool
		wantContext    bool
		wantExport     ExportInfo
	}{
		{"defaults", ClientOptions{}, true, true, testDisk},
		{"named export", ClientOptions{ExportName: "other"}, true, true, testOther},
		{"no block status", ClientOptions{NoBlockStatus: true}, true, false, testDisk},
		{"simple replies only", ClientOptions{NoStructuredReplies: true}, false, false, testDisk},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := pipe(t)
			ch := startServer(sc, testServerConfig())
			csess, err := clientHandshake(bufio.NewReader(cc), cc, &tt.opts)
			require.NoError(t, err)
			r := waitServer(t, ch)
			require.NoError(t, r.err)
			ssess := r.sess

			assert.False(t, ssess.Oldstyle)
			assert.Equal(t, tt.wantStructured, ssess.Structured)
			assert.Equal(t, tt.wantStructured, csess.Structured)
			assert.Equal(t, tt.wantContext, ssess.AllocationContext != 0)
			assert.Equal(t, ssess.AllocationContext, csess.AllocationContext, "both ends must agree on the context id")

			want := tt.wantExport.Flags | FlagHasFlags
			if tt.wantStructured {
				want |= FlagSendDF
			}
			assert.Equal(t, want, ssess.Flags)
			assert.Equal(t, ssess.Flags, csess.Flags)
			assert.Equal(t, tt.wantExport.Size, csess.Export.Size)
			assert.Equal(t, uint32(1), csess.Export.MinBlock)
			assert.Equal(t, uint32(4096), csess.Export.PreferredBlock)
			assert.Equal(t, uint32(DefaultMaxPayload), csess.Export.MaxBlock)
		})
	}
}

func TestHandshakeExportName(t *testing.T) {
	tests := []struct {
		name      string
		flags     ClientFlags
		wantZeros int
	}{
		{"fixed newstyle with zeroes", FlagCFixedNewstyle, zeroPadSize},
		{"fixed newstyle without zeroes", FlagCFixedNewstyle | FlagCNoZeroes, 0},
		{"plain newstyle", 0, zeroPadSize},
		{"plain newstyle without zeroes", FlagCNoZeroes, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc, sc := pipe(t)
			ch := make(chan handshakeResult, 1)
			go func() {
				sess, err := ServerHandshake(bufio.NewReader(sc), sc, testServerConfig())
				if err == nil {
					// A marker right after the handshake shows exactly where
					// the server thinks it ended.
					_, err = sc.Write([]byte("TX"))
				}
				ch <- handshakeResult{sess, err}
			}()
			c := newRawClient(t, cc)
			c.greet(tt.flags)
			c.option(OptExportName, []byte("other"))

			b := make([]byte, 10+tt.wantZeros+2)
			_, err := io.ReadFull(c.r, b)
			require.NoError(t, err)
			assert.Equal(t, testOther.Size, binary.BigEndian.Uint64(b[0:8]))
			assert.Equal(t, testOther.Flags|FlagHasFlags, TransmissionFlags(binary.BigEndian.Uint16(b[8:10])))
			assert.Equal(t, make([]byte, tt.wantZeros), b[10:10+tt.wantZeros])
			assert.Equal(t, "TX", string(b[10+tt.wantZeros:]))

			r := waitServer(t, ch)
			require.NoError(t, r.err)
			assert.Equal(t, testOther, r.sess.Export)
			assert.False(t, r.sess.Structured)
		})
	}
}

func TestHandshakeExportNameKeepsNegotiatedState(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle | FlagCNoZeroes)
	c.option(OptStructuredReply, nil)
	c.expect(OptStructuredReply, RepAck)
	c.option(OptSetMetaContext, metaData("disk", MetaContextBaseAllocation))
	c.expect(OptSetMetaContext, RepMetaContext)
	c.expect(OptSetMetaContext, RepAck)
	c.option(OptExportName, []byte("disk"))
	b := make([]byte, 10)
	_, err := io.ReadFull(c.r, b)
	require.NoError(t, err)

	r := waitServer(t, ch)
	require.NoError(t, r.err)
	assert.True(t, r.sess.Structured)
	assert.NotZero(t, r.sess.AllocationContext)
	assert.Equal(t, r.sess.Flags, TransmissionFlags(binary.BigEndian.Uint16(b[8:10])))
	assert.NotZero(t, r.sess.Flags&FlagSendDF, "DF needs structured replies, which were negotiated")
}

func TestHandshakeInfoThenGo(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle | FlagCNoZeroes)

	c.option(OptInfo, infoData("disk", InfoName, InfoDescription, InfoBlockSize))
	got := c.infos(OptInfo)
	require.Len(t, got[InfoExport], 10)
	assert.Equal(t, testDisk.Size, binary.BigEndian.Uint64(got[InfoExport]))
	assert.Equal(t, testDisk.Flags|FlagHasFlags, TransmissionFlags(binary.BigEndian.Uint16(got[InfoExport][8:])))
	assert.Equal(t, "disk", string(got[InfoName]))
	assert.Equal(t, testDisk.Description, string(got[InfoDescription]))
	require.Len(t, got[InfoBlockSize], 12)
	assert.Equal(t, uint32(1), binary.BigEndian.Uint32(got[InfoBlockSize][0:]))
	assert.Equal(t, uint32(4096), binary.BigEndian.Uint32(got[InfoBlockSize][4:]))
	assert.Equal(t, uint32(DefaultMaxPayload), binary.BigEndian.Uint32(got[InfoBlockSize][8:]))

	// INFO must leave negotiation open: an unknown export is refused and
	// GO still works afterwards.
	c.option(OptInfo, infoData("missing"))
	msg := c.expect(OptInfo, RepErrUnknown)
	assert.Contains(t, string(msg), "missing")

	sess := c.goDisk(ch)
	assert.Equal(t, testDisk, sess.Export)
}

func TestHandshakeList(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)

	c.option(OptList, nil)
	for _, e := range []ExportInfo{testDisk, testOther} {
		d := c.expect(OptList, RepServer)
		require.GreaterOrEqual(t, len(d), 4)
		n := binary.BigEndian.Uint32(d)
		require.LessOrEqual(t, int(n), len(d)-4)
		assert.Equal(t, e.Name, string(d[4:4+n]))
		assert.Equal(t, e.Description, string(d[4+n:]))
	}
	c.expect(OptList, RepAck)

	c.option(OptList, []byte("junk"))
	c.expect(OptList, RepErrInvalid)

	c.goDisk(ch)
}

func TestHandshakeAbort(t *testing.T) {
	cc, sc := pipe(t)
	ch := startServer(sc, testServerConfig())
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)
	c.option(OptAbort, nil)
	c.expect(OptAbort, RepAck)
	r := waitServer(t, ch)
	assert.ErrorIs(t, r.err, ErrAborted)
	assert.Nil(t, r.sess)
}

func TestHandshakeOldstyle(t *testing.T) {
	cfg := testServerConfig()
	cfg.Oldstyle = true

	t.Run("greeting bytes", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, cfg)
		b := make([]byte, 152)
		_, err := io.ReadFull(cc, b)
		require.NoError(t, err)
		assert.Equal(t, "NBDMAGIC", string(b[0:8]))
		assert.Equal(t, []byte{0, 0, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53}, b[8:16])
		assert.Equal(t, testDisk.Size, binary.BigEndian.Uint64(b[16:24]))
		assert.Equal(t, uint32(testDisk.Flags|FlagHasFlags), binary.BigEndian.Uint32(b[24:28]))
		assert.Equal(t, make([]byte, 124), b[28:])

		r := waitServer(t, ch)
		require.NoError(t, r.err)
		assert.True(t, r.sess.Oldstyle)
		assert.False(t, r.sess.Structured)
		assert.Equal(t, testDisk.Flags|FlagHasFlags, r.sess.Flags)
	})

	t.Run("client detects it", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, cfg)
		sess, err := clientHandshake(bufio.NewReader(cc), cc, &ClientOptions{})
		require.NoError(t, err)
		assert.True(t, sess.Oldstyle)
		assert.False(t, sess.Structured)
		assert.Equal(t, testDisk.Size, sess.Export.Size)
		assert.Equal(t, testDisk.Flags|FlagHasFlags, sess.Flags)
		require.NoError(t, waitServer(t, ch).err)
	})

	t.Run("lookup failure", func(t *testing.T) {
		_, sc := pipe(t)
		errGone := errors.New("export gone")
		bad := &ServerConfig{Oldstyle: true, Lookup: func(string) (ExportInfo, error) { return ExportInfo{}, errGone }}
		r := waitServer(t, startServer(sc, bad))
		assert.ErrorIs(t, r.err, errGone)
	})
}

func TestHandshakeClosing(t *testing.T) {
	cfg := testServerConfig()
	cfg.Closing = func() bool { return true }
	cc, sc := pipe(t)
	ch := startServer(sc, cfg)
	c := newRawClient(t, cc)
	c.greet(FlagCFixedNewstyle)
	for _, opt := range []Opt{OptStructuredReply, OptList, OptInfo, OptGo, OptSetMetaContext} {
		var data []byte
		if opt == OptInfo || opt == OptGo {
			data = infoData("disk")
		}
		c.option(opt, data)
		c.expect(opt, RepErrShutdown)
	}
	// ABORT is how a client is meant to react, so it must still work.
	c.option(OptAbort, nil)
	c.expect(OptAbort, RepAck)
	assert.ErrorIs(t, waitServer(t, ch).err, ErrAborted)
}

func TestHandshakeLookupError(t *testing.T) {
	errDenied := errors.New("export denied by policy")
	cfg := testServerConfig()
	cfg.Lookup = func(string) (ExportInfo, error) { return ExportInfo{}, errDenied }

	t.Run("GO gets ERR_UNKNOWN and may retry", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, cfg)
		c := newRawClient(t, cc)
		c.greet(FlagCFixedNewstyle)
		c.option(OptGo, infoData("disk"))
		assert.Equal(t, errDenied.Error(), string(c.expect(OptGo, RepErrUnknown)))
		c.option(OptAbort, nil)
		c.expect(OptAbort, RepAck)
		assert.ErrorIs(t, waitServer(t, ch).err, ErrAborted)
	})

	t.Run("long error text is cut to the string limit", func(t *testing.T) {
		cc, sc := pipe(t)
		// The default config quotes the name, which can make its error
		// text four times longer than the name.
		ch := startServer(sc, testServerConfig())
		c := newRawClient(t, cc)
		c.greet(FlagCFixedNewstyle)
		c.option(OptGo, infoData(string(make([]byte, MaxStringLen))))
		msg := c.expect(OptGo, RepErrUnknown)
		assert.Equal(t, MaxStringLen, len(msg))
		c.goDisk(ch)
	})

	t.Run("EXPORT_NAME closes the connection", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, cfg)
		c := newRawClient(t, cc)
		c.greet(FlagCFixedNewstyle)
		c.option(OptExportName, []byte("disk"))
		r := waitServer(t, ch)
		assert.ErrorIs(t, r.err, errDenied)
		_, err := c.r.ReadByte()
		assert.Error(t, err, "the server must send nothing and hang up")
	})

	t.Run("our client reports the refusal", func(t *testing.T) {
		cc, sc := pipe(t)
		ch := startServer(sc, cfg)
		_, err := clientHandshake(bufio.NewReader(cc), cc, &ClientOptions{ExportName: "disk"})
		var oe *OptionError
		require.ErrorAs(t, err, &oe)
		assert.Equal(t, OptGo, oe.Opt)
		assert.Equal(t, RepErrUnknown, oe.Rep)
		assert.Equal(t, errDenied.Error(), oe.Message)
		cc.Close()
		assert.Error(t, waitServer(t, ch).err)
	})
}
