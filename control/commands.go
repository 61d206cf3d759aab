package control

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
)

// dispatch runs one request and words its outcome.
func (s *Server) dispatch(lines []string) Reply {
	if len(lines) == 0 {
		return Reply{CodeMissingCommand, msgMissingCommand}
	}
	args := lines[1:]
	switch lines[0] {
	case CmdStatus:
		return s.handleStatus()
	case CmdACL:
		return s.handleACL(args)
	case CmdMirror:
		return s.handleMirror(args, false)
	case CmdMirrorWait:
		return s.handleMirror(args, true)
	case CmdMirrorMaxBps:
		return s.handleMirrorMaxBps(args)
	case CmdBreak:
		return s.handleBreak()
	case CmdUpstream:
		return s.handleUpstream(args)
	}
	return Reply{CodeUnknownCommand, msgUnknownCommand}
}

// sentinels are the Handler errors whose own text is the reply, however
// they were wrapped: the detail goes to the log, the C wording to the
// peer.
var sentinels = []error{
	ErrMirrorCompleted, ErrMirrorRunning, ErrMirrorConnect, ErrMirrorRejected,
	ErrMirrorNoGreeting, ErrMirrorSizeMismatch, ErrShuttingDown, ErrNotMirroring, ErrMirrorStopped,
	ErrNotProxy, ErrProxy,
}

func (s *Server) failure(cmd string, err error) Reply {
	if errors.Is(err, context.Canceled) && s.ctx.Err() != nil {
		// The Handler gave up because the server is closing.
		err = fmt.Errorf("%w: %w", ErrShuttingDown, err)
	}
	for _, e := range sentinels {
		if errors.Is(err, e) {
			if err != e {
				s.Logger.Info().Err(err).Str("command", cmd).Msg("control command failed")
			}
			return Reply{CodeFailed, e.Error()}
		}
	}
	return Reply{CodeFailed, err.Error()}
}

func (s *Server) handleStatus() Reply {
	return Reply{CodeOK, FormatFields(s.Handler.Status().Fields())}
}

func (s *Server) handleUpstream(upstreams []string) Reply {
	if len(upstreams) == 0 {
		return Reply{CodeFailed, "upstream takes at least one address"}
	}
	if err := s.Handler.SetUpstreams(upstreams); err != nil {
		return s.failure(CmdUpstream, err)
	}
	return Reply{CodeOK, msgUpdated}
}

func (s *Server) handleACL(entries []string) Reply {
	if err := s.Handler.SetACL(entries); err != nil {
		return s.failure(CmdACL, err)
	}
	return Reply{CodeOK, msgUpdated}
}

// handleMirror parses, in the C flexnbd's order and words: IP, PORT, then
// optionally an action, a bind address and a speed limit. With wait it
// answers once the migration has ended.
func (s *Server) handleMirror(args []string, wait bool) Reply {
	fail := func(msg string) Reply { return Reply{CodeFailed, msg} }
	if len(args) < 2 {
		return fail("mirror takes at least two parameters")
	}
	ip, err := netip.ParseAddr(args[0])
	if err != nil {
		return fail("bad IP address")
	}
	port, err := strconv.ParseUint(args[1], 10, 16)
	if err != nil || port == 0 {
		return fail("bad IP port number")
	}
	req := MirrorRequest{
		Target:            netip.AddrPortFrom(ip, uint16(port)),
		Action:            ActionExit,
		MaxBytesPerSecond: NoSpeedLimit,
	}
	if len(args) > 2 {
		switch args[2] {
		case "exit":
			req.Action = ActionExit
		case "unlink":
			req.Action = ActionUnlink
		case "nothing":
			req.Action = ActionNothing
		default:
			return fail("action must be 'exit', 'unlink' or 'nothing'")
		}
	}
	if len(args) > 3 {
		if req.Bind, err = netip.ParseAddr(args[3]); err != nil {
			return fail("bad bind address")
		}
	}
	if len(args) > 4 {
		if req.MaxBytesPerSecond, err = strconv.ParseUint(args[4], 10, 64); err != nil {
			if errors.Is(err, strconv.ErrRange) {
				return fail("max_bps out of range")
			}
			return fail("max_bps couldn't be parsed")
		}
	}
	if len(args) > 5 {
		return fail("unrecognised parameters to mirror")
	}
	if err := s.Handler.Mirror(s.ctx, req); err != nil {
		return s.failure(CmdMirror, err)
	}
	if !wait {
		return Reply{CodeOK, msgMirrorStarted}
	}
	msg, err := s.Handler.WaitMirror(s.ctx)
	if err != nil {
		return s.failure(CmdMirrorWait, err)
	}
	return Reply{CodeOK, msg}
}

// handleMirrorMaxBps answers "Not currently mirroring" before looking at
// the argument, as the C flexnbd does.
func (s *Server) handleMirrorMaxBps(args []string) Reply {
	var n uint64
	var perr error
	if len(args) != 1 {
		perr = errors.New(msgBadFormat)
	} else if n, perr = strconv.ParseUint(args[0], 10, 64); errors.Is(perr, strconv.ErrRange) {
		perr = errors.New("max_bps out of range")
	} else if perr != nil {
		perr = errors.New(msgBadFormat)
	}
	if perr != nil {
		if !s.Handler.Status().IsMirroring {
			return Reply{CodeFailed, msgNotMirroringBps}
		}
		return Reply{CodeFailed, perr.Error()}
	}
	if err := s.Handler.SetMirrorSpeed(n); err != nil {
		if errors.Is(err, ErrNotMirroring) {
			return Reply{CodeFailed, msgNotMirroringBps}
		}
		return s.failure(CmdMirrorMaxBps, err)
	}
	return Reply{CodeOK, msgUpdated}
}

func (s *Server) handleBreak() Reply {
	if err := s.Handler.Break(s.ctx); err != nil {
		return s.failure(CmdBreak, err)
	}
	return Reply{CodeOK, msgMirrorStopped}
}
