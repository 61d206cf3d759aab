package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/flexnbd/flexnbd/control"
)

// MirrorCmd is `flexnbd mirror`: it asks a running serve to migrate its
// export to a listening destination.
type MirrorCmd struct {
	controlFlags
	Addr     string `short:"l" required:"" help:"Address of the destination (flexnbd listen)."`
	Port     uint16 `short:"p" required:"" help:"Port of the destination."`
	Unlink   bool   `short:"u" help:"Remove the source file once the destination acknowledged its final flush, before the hand-off."`
	Bind     string `short:"b" help:"Local address to connect from."`
	MaxSpeed uint64 `short:"m" name:"max-speed" type:"size" placeholder:"BYTES_PER_SEC" help:"Limit what the migration sends, in bytes per second, 100M for example (0: no limit)."`
	Wait     bool   `short:"w" help:"Stay until the migration ends, showing its progress; exit 0 once the destination took over, 1 with the reason otherwise."`
}

// Run starts the migration, and with --wait follows it to its end.
func (c *MirrorCmd) Run() error {
	ip, err := resolve(c.Addr)
	if err != nil {
		return err
	}
	action := "exit"
	if c.Unlink {
		action = "unlink"
	}
	args := []string{ip, strconv.Itoa(int(c.Port)), action}
	if c.Bind != "" || c.MaxSpeed != 0 {
		bind := c.Bind
		if bind == "" {
			bind = "0.0.0.0" // any: the server lets the system choose
		}
		args = append(args, bind)
	}
	if c.MaxSpeed != 0 {
		args = append(args, strconv.FormatUint(c.MaxSpeed, 10))
	}
	if !c.Wait {
		r, err := c.do(control.CmdMirror, args...)
		if err != nil {
			return err
		}
		return report(r)
	}
	return c.follow(args)
}

// resolve turns a host name into the address the control socket wants.
func resolve(host string) (string, error) {
	if ip := net.ParseIP(host); ip != nil {
		return ip.String(), nil
	}
	addrs, err := net.DefaultResolver.LookupHost(context.Background(), host)
	if err != nil {
		return "", fmt.Errorf("destination %s: %w", host, err)
	}
	return addrs[0], nil
}

// progressEvery is how often --wait asks for the status.
const progressEvery = 500 * time.Millisecond

// follow starts the migration with mirror_wait, whose answer comes when
// the migration ends, and meanwhile shows the progress from status: a bar
// on a terminal, a line every few seconds otherwise.
func (c *MirrorCmd) follow(args []string) error {
	type outcome struct {
		r   control.Reply
		err error
	}
	ended := make(chan outcome, 1)
	go func() {
		cl := control.Client{Path: c.Sock, Timeout: -1}
		r, err := cl.Do(context.Background(), control.CmdMirrorWait, args...)
		ended <- outcome{r, err}
	}()
	var p progress
	if term.IsTerminal(int(os.Stderr.Fd())) {
		p = newBar(os.Stderr)
	} else {
		p = &progressLines{w: os.Stderr}
	}
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	for {
		select {
		case o := <-ended:
			p.done()
			if o.err != nil {
				return o.err
			}
			if o.r.Code == control.CodeUnknownCommand {
				return fmt.Errorf("%s does not support --wait (mirror_wait)", c.Sock)
			}
			return report(o.r)
		case <-tick.C:
			st, ok := c.status()
			if ok && st["is_mirroring"] == "true" {
				p.show(st)
			}
		}
	}
}

// status asks for the status fields by name; a failure only skips a tick.
func (c *MirrorCmd) status() (map[string]string, bool) {
	cl := control.Client{Path: c.Sock, Timeout: 5 * time.Second}
	r, fields, err := cl.Status(context.Background())
	if err != nil || !r.OK() {
		return nil, false
	}
	m := make(map[string]string, len(fields))
	for _, f := range fields {
		m[f.Key] = f.Value
	}
	return m, true
}

type progress interface {
	show(st map[string]string)
	done()
}

func num(st map[string]string, key string) int64 {
	n, _ := strconv.ParseInt(st[key], 10, 64)
	return n
}

// bar draws the progress on a terminal: bytes done of the export, speed,
// pass and mode, time left.
type bar struct {
	w   io.Writer
	bar *progressbar.ProgressBar
}

func newBar(w io.Writer) *bar { return &bar{w: w} }

func (b *bar) show(st map[string]string) {
	size := num(st, "size")
	if b.bar == nil {
		b.bar = progressbar.NewOptions64(size,
			progressbar.OptionSetWriter(b.w),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetPredictTime(false),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionShowDescriptionAtLineEnd(),
			progressbar.OptionUseIECUnits(true),
		)
	}
	b.bar.Describe(fmt.Sprintf("pass %s %s, %s/s, ETA %ss", st["migration_pass"], st["migration_mode"],
		humanize.IBytes(uint64(num(st, "migration_speed"))), st["migration_seconds_left"]))
	_ = b.bar.Set64(max(size-num(st, "migration_bytes_left"), 0))
}

func (b *bar) done() {
	if b.bar != nil {
		_ = b.bar.Exit()
		fmt.Fprintln(b.w)
	}
}

// progressLines reports the progress as plain lines for logs, at most one every
// few seconds.
type progressLines struct {
	w    io.Writer
	last time.Time
}

const linesEvery = 2 * time.Second

func (l *progressLines) show(st map[string]string) {
	if time.Since(l.last) < linesEvery {
		return
	}
	l.last = time.Now()
	size := num(st, "size")
	done := max(size-num(st, "migration_bytes_left"), 0)
	speed := num(st, "migration_speed")
	fmt.Fprintf(l.w, "migration: pass=%s mode=%s done=%d/%d speed=%d eta=%ss attempts=%s done_human=%s/%s speed_human=%s/s\n",
		st["migration_pass"], st["migration_mode"], done, size, speed, st["migration_seconds_left"], st["migration_attempts"],
		oneWord(done), oneWord(size), oneWord(speed))
}

func (l *progressLines) done() {}

// oneWord writes a byte count with binary units and no space (1.5GiB),
// so that each key=value of a progress line stays one word.
func oneWord(n int64) string {
	return strings.ReplaceAll(humanize.IBytes(uint64(max(n, 0))), " ", "")
}
