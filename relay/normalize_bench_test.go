package relay

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"math"
	"testing"
)

// BenchmarkNormalize reads a message of base64 lines, as attachments
// are sent, through the normalizer in the door's reads.
func BenchmarkNormalize(b *testing.B) {
	for _, size := range []int{10 << 10, 100 << 10} {
		b.Run(fmt.Sprintf("%dKB", size>>10), func(b *testing.B) {
			raw := make([]byte, size*3/4)
			rand.Read(raw)
			var msg bytes.Buffer
			enc := base64.StdEncoding.EncodeToString(raw)
			for len(enc) > 76 {
				msg.WriteString(enc[:76] + "\r\n")
				enc = enc[76:]
			}
			in := msg.Bytes()
			out := make([]byte, 0, headroom+2*len(in)+8)
			b.SetBytes(int64(len(in)))
			for b.Loop() {
				n := newNormalizer(bytes.NewReader(in))
				got, err := n.fill(out[:headroom], math.MaxInt)
				if err != nil || len(got) != headroom+len(in) {
					b.Fatalf("%d bytes, %v", len(got), err)
				}
			}
		})
	}
}
