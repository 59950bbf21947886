package main

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/dkim"
)

// BenchmarkRelay sends messages one after another through a whole relay
// on loopback: a client's DATA, the queue on disk, DKIM when on, and the
// delivery to an upstream, each op ending when the upstream has the
// message. The client and the upstream are plain sockets doing as little
// as an SMTP peer can, so that the process's CPU time (cpu-ms/msg) is the
// relay's.
func BenchmarkRelay(b *testing.B) {
	for _, dk := range []bool{false, true} {
		for _, size := range []int{10 << 10, 100 << 10} {
			name := fmt.Sprintf("plain/%dKB", size>>10)
			if dk {
				name = fmt.Sprintf("dkim/%dKB", size>>10)
			}
			b.Run(name, func(b *testing.B) { benchRelay(b, size, dk) })
		}
	}
}

func benchRelay(b *testing.B, size int, withDKIM bool) {
	sink := startBenchSink(b)
	path := serveConfig(b, sink.addr(), "")
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	b.Setenv("SMARTHOST_TEST_ADMIN", "x")
	cfg, err := config.Parse(data, path)
	if err != nil {
		b.Fatal(err)
	}
	if withDKIM {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		cfg.DKIM = []dkim.Key{{Domain: "example.com", Selector: "s", Signer: key}}
	}
	inst, err := start(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { inst.shutdown(b.Context()) })

	conn, err := net.Dial("tcp", inst.addrs()[0])
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	c := &benchClient{r: bufio.NewReader(conn), w: conn}
	c.expect(b, "220")
	c.send(b, "EHLO client.test\r\n")
	c.expect(b, "250")
	msg := benchMessage(size)
	tx := append([]byte("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"), msg...)
	tx = append(tx, ".\r\n"...)

	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	before := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		if _, err := conn.Write(tx); err != nil {
			b.Fatal(err)
		}
		c.expect(b, "250")
		c.expect(b, "250")
		c.expect(b, "354")
		c.expect(b, "250")
		select {
		case n := <-sink.got:
			if n < len(msg) {
				b.Fatalf("upstream got %d bytes of a %d-byte message", n, len(msg))
			}
		case <-time.After(10 * time.Second):
			b.Fatal("message not delivered in 10s")
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-before)/float64(b.N)/1e6, "cpu-ms/msg")
}

// cpuTime is the process's user and system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchMessage is a message with an attachment of about size bytes, in
// base64 lines as mail clients write them.
func benchMessage(size int) []byte {
	var buf bytes.Buffer
	buf.WriteString("From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: invoice\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n")
	raw := make([]byte, 57)
	line := make([]byte, 76)
	for buf.Len() < size {
		rand.Read(raw)
		base64.StdEncoding.Encode(line, raw)
		buf.Write(line)
		buf.WriteString("\r\n")
	}
	return buf.Bytes()
}

type benchClient struct {
	r *bufio.Reader
	w io.Writer
}

func (c *benchClient) send(b *testing.B, s string) {
	if _, err := io.WriteString(c.w, s); err != nil {
		b.Fatal(err)
	}
}

// expect reads one reply, of any number of lines, and fails unless its
// code is code.
func (c *benchClient) expect(b *testing.B, code string) {
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			b.Fatal(err)
		}
		if !strings.HasPrefix(line, code) {
			b.Fatalf("reply %q, want %s", line, code)
		}
		if len(line) < 4 || line[3] != '-' {
			return
		}
	}
}

// benchSink is an upstream that takes every message, by DATA or BDAT
// (it offers CHUNKING), and sends the size of each on got.
type benchSink struct {
	ln  net.Listener
	got chan int
}

func startBenchSink(b *testing.B) *benchSink {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s := &benchSink{ln: ln, got: make(chan int, 1)}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.serve(c)
		}
	}()
	return s
}

func (s *benchSink) addr() string { return s.ln.Addr().String() }

func (s *benchSink) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 64<<10)
	w := bufio.NewWriter(c)
	reply := func(l string) bool {
		w.WriteString(l)
		return w.Flush() == nil
	}
	if !reply("220 sink ESMTP\r\n") {
		return
	}
	chunked := 0
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		cmd := strings.ToUpper(string(bytes.Fields(line)[0]))
		switch cmd {
		case "EHLO":
			reply("250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SIZE 104857600\r\n")
		case "DATA":
			reply("354 go on\r\n")
			n, ok := readDotted(r)
			if !ok {
				return
			}
			reply("250 2.0.0 ok\r\n")
			s.got <- n
		case "BDAT":
			f := bytes.Fields(line)
			n, err := strconv.Atoi(string(f[1]))
			if err != nil {
				return
			}
			if _, err := r.Discard(n); err != nil {
				return
			}
			chunked += n
			reply("250 2.0.0 ok\r\n")
			if len(f) > 2 {
				s.got <- chunked
				chunked = 0
			}
		case "QUIT":
			reply("221 bye\r\n")
			return
		default:
			reply("250 ok\r\n")
		}
	}
}

// readDotted reads DATA up to its end line and returns its size.
func readDotted(r *bufio.Reader) (int, bool) {
	n := 0
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return n, false
		}
		if string(line) == ".\r\n" {
			return n, true
		}
		n += len(line)
	}
}
