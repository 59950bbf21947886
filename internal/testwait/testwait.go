// Package testwait waits in tests for a condition that no channel
// announces: a count another goroutine or process raises, a file that
// appears, a state reached in the background.
package testwait

import (
	"testing"
	"time"
)

// Polling starts at minPoll, so that a condition met at once costs a
// test nothing, and backs off to maxPoll, so that a long wait does not
// spin a core that the code under test needs (conditions read files,
// /proc and logs).
const (
	minPoll = time.Millisecond
	maxPoll = 25 * time.Millisecond
)

// For polls cond until it returns true, and fails t with what if timeout
// passes first. cond runs in the calling goroutine and may use t.
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	poll := minPoll
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(poll)
		poll = min(2*poll, maxPoll)
	}
}
