package config_test

import (
	"testing"

	"smarthost/cmd/smarthost/internal/config"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"25MB", 25 << 20, true},
		{"512KB", 512 << 10, true},
		{"1GB", 1 << 30, true},
		{"1048576", 1048576, true},
		{"0", 0, true},
		{"10B", 10, true},
		{"4KiB", 4096, true},
		{"2MiB", 2 << 20, true},
		{"3GiB", 3 << 30, true},
		{"25mb", 25 << 20, true},
		{" 25 MB ", 25 << 20, true},
		{"8G", 8 << 30, true},
		{"", 0, false},
		{"MB", 0, false},
		{"-1", 0, false},
		{"-5MB", 0, false},
		{"+5MB", 0, false},
		{"1.5MB", 0, false},
		{"25XB", 0, false},
		{"25 M B", 0, false},
		{"0x10", 0, false},
		{"twenty", 0, false},
		{"9223372036854775807", 9223372036854775807, true},
		{"9223372036854775808", 0, false},
		{"8589934592GB", 0, false},
		{"9007199254740992KB", 0, false},
	}
	for _, tt := range tests {
		got, err := config.ParseSize(tt.in)
		if tt.ok && (err != nil || got != tt.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
		if !tt.ok && err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", tt.in, got)
		}
	}
}
