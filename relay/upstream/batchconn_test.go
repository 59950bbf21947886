package upstream

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int32
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// loopbackPair returns both ends of a TCP connection on loopback.
func loopbackPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestBatchConnWritesInFewPieces: a message written in go-smtp's 4 KiB
// pieces reaches the peer whole and in order, in a few socket writes, and
// the read that waits for the reply sends what was held.
func TestBatchConnWritesInFewPieces(t *testing.T) {
	client, server := loopbackPair(t)
	counted := &countingConn{Conn: client}
	bc := newBatchConn(counted)
	msg := make([]byte, 150<<10)
	rand.Read(msg)

	got := make(chan []byte, 1)
	go func() {
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(server, buf); err != nil {
			got <- nil
			return
		}
		got <- buf
		server.Write([]byte("250 ok\r\n"))
	}()
	for p := msg; len(p) > 0; p = p[min(4096, len(p)):] {
		if _, err := bc.Write(p[:min(4096, len(p))]); err != nil {
			t.Fatal(err)
		}
	}
	bc.SetReadDeadline(time.Now().Add(5 * time.Second))
	reply := make([]byte, 16)
	n, err := bc.Read(reply)
	if err != nil {
		t.Fatalf("reading the reply: %v", err)
	}
	if string(reply[:n]) != "250 ok\r\n" {
		t.Errorf("reply %q", reply[:n])
	}
	if b := <-got; !bytes.Equal(b, msg) {
		t.Fatal("the peer did not get the message as written")
	}
	// 150 KiB in 64 KiB batches.
	if w := counted.writes.Load(); w != 3 {
		t.Errorf("%d socket writes for 150 KiB, want 3", w)
	}
}

// TestBatchConnWriteErrorSticks: once a write to the socket failed, later
// writes and reads fail too, so that a broken connection is not taken for
// a quiet upstream.
func TestBatchConnWriteErrorSticks(t *testing.T) {
	client, server := loopbackPair(t)
	bc := newBatchConn(client)
	server.Close()
	client.(*net.TCPConn).CloseWrite()
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		_, err = bc.Write(make([]byte, batchSize))
	}
	if err == nil {
		t.Fatal("writes to a closed connection kept succeeding")
	}
	if _, err2 := bc.Write([]byte("x")); !errors.Is(err2, err) {
		t.Errorf("write after a failure: %v, want %v", err2, err)
	}
	if _, err2 := bc.Read(make([]byte, 1)); !errors.Is(err2, err) {
		t.Errorf("read after a failure: %v, want %v", err2, err)
	}
}
