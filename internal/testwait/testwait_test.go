package testwait

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fatalRecorder is a testing.TB whose Fatalf records the message and
// ends the goroutine, as the real one does.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (r *fatalRecorder) Helper() {}

func (r *fatalRecorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(r)
}

func TestForReturnsOnceTrue(t *testing.T) {
	var n atomic.Int32
	go func() {
		time.Sleep(30 * time.Millisecond)
		n.Store(1)
	}()
	start := time.Now()
	For(t, 10*time.Second, "the store", func() bool { return n.Load() == 1 })
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("returned after %s", d)
	}
}

func TestForFailsAtDeadline(t *testing.T) {
	r := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer func() {
			if p := recover(); p != r {
				t.Errorf("recovered %v, want the Fatalf", p)
			}
		}()
		For(r, 50*time.Millisecond, "nothing", func() bool { return false })
	}()
	<-done
	if !strings.Contains(r.msg, "nothing") || !strings.Contains(r.msg, "50ms") {
		t.Errorf("Fatalf message %q names neither what nor the timeout", r.msg)
	}
}
