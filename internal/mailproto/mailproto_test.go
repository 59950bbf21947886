package mailproto

import "testing"

func TestHeaderEnd(t *testing.T) {
	for _, tc := range []struct {
		msg   string
		end   int
		blank bool
	}{
		{"From: a@b\r\nSubject: x\r\n\r\nbody\r\n", 23, true},
		{"From: a@b\r\nSubject: x\r\n  folded\r\n\r\nbody\r\n", 33, true},
		{"From: a@b\r\nnot a header\r\n", 11, false},
		{"just a body\r\n", 0, false},
		{" leading space\r\n", 0, false},
		{"\r\nbody\r\n", 0, true},
		{"From: a@b\r\n", 11, false},
		{"Bad Name: x\r\n\r\n", 0, false},
	} {
		end, blank := HeaderEnd([]byte(tc.msg))
		if end != tc.end || blank != tc.blank {
			t.Errorf("HeaderEnd(%q) = %d, %v; want %d, %v", tc.msg, end, blank, tc.end, tc.blank)
		}
	}
}
