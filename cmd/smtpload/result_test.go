package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ms := time.Millisecond
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * ms
	}
	tests := []struct {
		values []time.Duration
		p      float64
		want   time.Duration
	}{
		{nil, 50, 0},
		{[]time.Duration{7 * ms}, 50, 7 * ms},
		{[]time.Duration{7 * ms}, 99, 7 * ms},
		{hundred, 50, 50 * ms},
		{hundred, 90, 90 * ms},
		{hundred, 99, 99 * ms},
		{hundred, 100, 100 * ms},
		{hundred, 0, 1 * ms},
		{hundred, 99.5, 100 * ms},
		// Nearest rank: the 2nd of 4 is the smallest value that covers 50%.
		{[]time.Duration{1 * ms, 2 * ms, 3 * ms, 4 * ms}, 50, 2 * ms},
		{[]time.Duration{1 * ms, 2 * ms, 3 * ms, 4 * ms}, 51, 3 * ms},
		{[]time.Duration{1 * ms, 2 * ms, 3 * ms, 4 * ms}, 90, 4 * ms},
	}
	for _, tt := range tests {
		if got := Percentile(tt.values, tt.p); got != tt.want {
			t.Errorf("Percentile(%d values, %v) = %v, want %v", len(tt.values), tt.p, got, tt.want)
		}
	}
}

func sampleResult() Result {
	return Result{
		Messages:       10,
		Sent:           6,
		Failed:         map[string]int{"452 4.3.1": 3},
		Replies:        map[string]string{"452 4.3.1": "Insufficient\nsystem storage"},
		ConnErrors:     1,
		FirstConnError: "connect: dial tcp 127.0.0.1:1: connection refused",
		Connections:    2,
		Bytes:          6 << 20,
		Wall:           2 * time.Second,
		Latencies:      []time.Duration{1 * time.Millisecond, 2 * time.Millisecond, 3 * time.Millisecond, 4 * time.Millisecond, 5 * time.Millisecond, 60 * time.Millisecond},
		Setups:         []time.Duration{3 * time.Millisecond, 5 * time.Millisecond},
	}
}

func TestResultText(t *testing.T) {
	var b bytes.Buffer
	if err := sampleResult().WriteText(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"sent ok:            6 of 10\n",
		"failed:             3\n",
		"  452 4.3.1: 3  (Insufficient system storage)\n",
		"connection errors:  1  (first: connect: dial tcp 127.0.0.1:1: connection refused)\n",
		"connections:        2\n",
		"wall time:          2s\n",
		"throughput:         3.0 msgs/s, 3.00 MB/s\n",
		"latency:            p50 3ms  p90 60ms  p99 60ms  max 60ms",
		"connection setup:   p50 3ms\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("text result lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "not sent") {
		t.Errorf("a complete run reports messages not sent:\n%s", out)
	}
}

func TestResultJSON(t *testing.T) {
	var b bytes.Buffer
	if err := sampleResult().WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var got jsonResult
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatalf("%v:\n%s", err, b.String())
	}
	if got.Messages != 10 || got.Sent != 6 || got.Failed["452 4.3.1"] != 3 || got.ConnectionErrors != 1 ||
		got.Connections != 2 || got.WallSeconds != 2 || got.MsgsPerSecond != 3 || got.MBPerSecond != 3 ||
		got.LatencyMS.P50 != 3 || got.LatencyMS.Max != 60 || got.ConnectMS.P50 != 3 {
		t.Errorf("JSON result %+v from\n%s", got, b.String())
	}

	// An empty result still has an object for failed, not null.
	b.Reset()
	if err := (Result{Messages: 1}).WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"failed": {}`) {
		t.Errorf("empty result: %s", b.String())
	}
}
