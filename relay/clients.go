package relay

import (
	"net/netip"
	"sync"
)

// clientKey is the unit that per-client limits count: an IPv4 address, or
// the /64 of an IPv6 address, since one IPv6 host commonly holds a whole
// /64 and could otherwise take a new address for every try.
func clientKey(ip netip.Addr) netip.Prefix {
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, err := ip.Prefix(bits)
	if err != nil {
		return netip.Prefix{} // the invalid address of a connection with no IP
	}
	return p
}

// clientCounts counts the open connections of each client (clientKey)
// against a limit.
type clientCounts struct {
	limit int // 0: no limit

	mu sync.Mutex
	m  map[netip.Prefix]int
}

func newClientCounts(limit int) *clientCounts {
	return &clientCounts{limit: limit, m: make(map[netip.Prefix]int)}
}

// acquire counts a new connection from ip, or reports false, counting
// nothing, when ip already holds limit connections.
func (c *clientCounts) acquire(ip netip.Addr) bool {
	if c.limit <= 0 {
		return true
	}
	k := clientKey(ip)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m[k] >= c.limit {
		return false
	}
	c.m[k]++
	return true
}

// release gives back a connection acquire counted.
func (c *clientCounts) release(ip netip.Addr) {
	if c.limit <= 0 {
		return
	}
	k := clientKey(ip)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m[k] <= 1 {
		delete(c.m, k)
		return
	}
	c.m[k]--
}
