package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Result is what a run did. Every message is counted once: Sent, the
// counts in Failed, ConnErrors and NotSent add up to Messages.
type Result struct {
	Messages       int               // messages requested
	Sent           int               // answered 250 after DATA
	Failed         map[string]int    // refused with a reply, by code: "452 4.3.1"
	Replies        map[string]string // the first reply text for each key of Failed
	ConnErrors     int               // lost to a connection that could not be set up or broke
	FirstConnError string            // the first of those errors
	NotSent        int               // not attempted: the run was interrupted or stopped
	Interrupted    bool              // the run's context ended (ctrl-C)
	Stopped        string            // why the run stopped early after a setup failure, if it did
	Connections    int               // connections set up: TCP, TLS, EHLO and AUTH done
	Bytes          int64             // bytes of the messages sent
	Wall           time.Duration     // from the start of the first session to the end of the last
	Latencies      []time.Duration   // MAIL FROM to the 250 after DATA of each sent message, sorted
	Setups         []time.Duration   // setup time of each connection, sorted
}

// OK reports whether every message was answered 250.
func (r Result) OK() bool { return r.Sent == r.Messages }

// Percentile is the p-th percentile (0 < p ≤ 100) of sorted durations by
// the nearest-rank method: the smallest value that at least p percent of
// the values do not exceed. It is 0 for no values.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

// perSecond is n per second of wall time.
func (r Result) perSecond(n float64) float64 {
	if r.Wall <= 0 {
		return 0
	}
	return n / r.Wall.Seconds()
}

// failedTotal is the number of messages refused with a reply.
func (r Result) failedTotal() int {
	n := 0
	for _, v := range r.Failed {
		n += v
	}
	return n
}

// WriteText prints the result for a person to read.
func (r Result) WriteText(w io.Writer) error {
	var b strings.Builder
	line := func(label, format string, args ...any) {
		fmt.Fprintf(&b, "%-19s %s\n", label+":", fmt.Sprintf(format, args...))
	}
	line("sent ok", "%d of %d", r.Sent, r.Messages)
	line("failed", "%d", r.failedTotal())
	keys := make([]string, 0, len(r.Failed))
	for k := range r.Failed {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s: %d", k, r.Failed[k])
		if text := oneLine(r.Replies[k]); text != "" {
			fmt.Fprintf(&b, "  (%s)", text)
		}
		b.WriteString("\n")
	}
	// A stop caused by a connection error is told once, on its own line.
	if r.FirstConnError != "" && r.FirstConnError != r.Stopped {
		line("connection errors", "%d  (first: %s)", r.ConnErrors, oneLine(r.FirstConnError))
	} else {
		line("connection errors", "%d", r.ConnErrors)
	}
	switch {
	case r.Stopped != "":
		line("not sent", "%d  (stopped: %s)", r.NotSent, oneLine(r.Stopped))
	case r.Interrupted:
		line("not sent", "%d  (interrupted)", r.NotSent)
	case r.NotSent > 0:
		line("not sent", "%d", r.NotSent)
	}
	line("connections", "%d", r.Connections)
	line("wall time", "%s", roundDuration(r.Wall))
	line("throughput", "%.1f msgs/s, %.2f MB/s", r.perSecond(float64(r.Sent)), r.perSecond(float64(r.Bytes)/(1<<20)))
	line("latency", "p50 %s  p90 %s  p99 %s  max %s  (MAIL FROM to 250 after DATA)",
		roundDuration(Percentile(r.Latencies, 50)), roundDuration(Percentile(r.Latencies, 90)),
		roundDuration(Percentile(r.Latencies, 99)), roundDuration(Percentile(r.Latencies, 100)))
	line("connection setup", "p50 %s", roundDuration(Percentile(r.Setups, 50)))
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("write result: %w", err)
	}
	return nil
}

// jsonResult is the -json form of a Result. Durations are in
// milliseconds, sizes in MB of 2^20 bytes, like -size.
type jsonResult struct {
	Messages         int            `json:"messages"`
	Sent             int            `json:"sent"`
	Failed           map[string]int `json:"failed"`
	ConnectionErrors int            `json:"connection_errors"`
	NotSent          int            `json:"not_sent"`
	Interrupted      bool           `json:"interrupted"`
	Stopped          string         `json:"stopped,omitempty"`
	Connections      int            `json:"connections"`
	Bytes            int64          `json:"bytes"`
	WallSeconds      float64        `json:"wall_seconds"`
	MsgsPerSecond    float64        `json:"msgs_per_second"`
	MBPerSecond      float64        `json:"mb_per_second"`
	LatencyMS        struct {
		P50 float64 `json:"p50"`
		P90 float64 `json:"p90"`
		P99 float64 `json:"p99"`
		Max float64 `json:"max"`
	} `json:"latency_ms"`
	ConnectMS struct {
		P50 float64 `json:"p50"`
	} `json:"connect_ms"`
}

// WriteJSON prints the result as one JSON object.
func (r Result) WriteJSON(w io.Writer) error {
	j := jsonResult{
		Messages:         r.Messages,
		Sent:             r.Sent,
		Failed:           r.Failed,
		ConnectionErrors: r.ConnErrors,
		NotSent:          r.NotSent,
		Interrupted:      r.Interrupted,
		Stopped:          r.Stopped,
		Connections:      r.Connections,
		Bytes:            r.Bytes,
		WallSeconds:      r.Wall.Seconds(),
		MsgsPerSecond:    r.perSecond(float64(r.Sent)),
		MBPerSecond:      r.perSecond(float64(r.Bytes) / (1 << 20)),
	}
	if j.Failed == nil {
		j.Failed = map[string]int{}
	}
	j.LatencyMS.P50 = ms(Percentile(r.Latencies, 50))
	j.LatencyMS.P90 = ms(Percentile(r.Latencies, 90))
	j.LatencyMS.P99 = ms(Percentile(r.Latencies, 99))
	j.LatencyMS.Max = ms(Percentile(r.Latencies, 100))
	j.ConnectMS.P50 = ms(Percentile(r.Setups, 50))
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(j); err != nil {
		return fmt.Errorf("write JSON result: %w", err)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// roundDuration keeps three or four significant digits.
func roundDuration(d time.Duration) time.Duration {
	switch {
	case d < time.Millisecond:
		return d.Round(time.Microsecond)
	case d < time.Second:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Millisecond)
}

// oneLine keeps a multi-line reply text on its line of the report.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
