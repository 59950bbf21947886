package queue

import "time"

// DatabaseStats is the state of a PGStore's connections to its database
// and of the leases it took over, for the metrics.
type DatabaseStats struct {
	Connections    int // open, idle or in use
	InUse          int
	MaxConnections int
	// Acquires counts the connections taken from the pool, Waited those
	// that had to wait for one, and AcquireWait the time spent waiting.
	Acquires    int64
	Waited      int64
	AcquireWait time.Duration
	// Takeovers counts the messages this replica claimed from another
	// whose lease had lapsed: that replica died, or lost the database.
	Takeovers uint64
}

// DatabaseStats returns the pool's counters and the takeovers so far.
func (s *PGStore) DatabaseStats() DatabaseStats {
	st := s.pool.Stat()
	return DatabaseStats{
		Connections:    int(st.TotalConns()),
		InUse:          int(st.AcquiredConns()),
		MaxConnections: int(st.MaxConns()),
		Acquires:       st.AcquireCount(),
		Waited:         st.EmptyAcquireCount(),
		AcquireWait:    st.AcquireDuration(),
		Takeovers:      s.Takeovers(),
	}
}
