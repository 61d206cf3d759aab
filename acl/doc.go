// Package acl implements the IP access control lists that flexnbd applies
// to every accepted connection, with the C flexnbd's semantics.
//
// An entry is one of:
//
//   - a bare address: "10.0.0.1", "::1", "fe80::1";
//   - an address with a prefix length: "10.0.0.0/8" (1-32 for IPv4),
//     "2001:db8::/32" (1-128 for IPv6);
//   - a bracketed IPv6 address, optionally with a prefix length:
//     "[::1]", "[2001:db8::]/32".
//
// A prefix length of 0 is rejected, as the C tool rejects it. So are zone
// ids ("fe80::1%eth0"), which name an interface rather than peers;
// bracketed IPv4 addresses; and any surrounding whitespace, since an
// orchestrator passes one entry per argument and stray whitespace there is
// a mistake rather than formatting. A rejected entry is reported as a
// *BadSpecError, whose text is what the control socket sends back after
// its "1: " status.
//
// Matching rules:
//
//   - An empty list admits every peer, unless it was built with default
//     deny, in which case it admits none.
//   - A non-empty list admits a peer only if at least one entry contains
//     the peer's address.
//   - An IPv4 peer and the same peer seen as an IPv4-mapped IPv6 address
//     ("::ffff:10.0.0.1", as a dual-stack listener reports it) are treated
//     alike, so the decision does not depend on how the listener is bound:
//     IPv4 entries match both, and so does any IPv6 entry whose range
//     contains the mapped address ("::ffff:10.0.0.0/104", but also a wide
//     one such as "::/8"). Other IPv6 entries never match an IPv4 peer, and
//     IPv4 entries never match a native IPv6 peer.
//   - A zone on the peer's address is ignored, so a link-local peer matches
//     a link-local entry whichever interface it arrived on.
//   - Unix-socket peers are local and always admitted.
//   - A peer whose address the list cannot judge (another kind of
//     net.Addr, a missing one or a malformed IP) matches no entry, so only
//     a list that admits everyone admits it.
//
// A *List never changes after New and may be shared between goroutines;
// to change the rules, build a new List and swap the pointer.
package acl
