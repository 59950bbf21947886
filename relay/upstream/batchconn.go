package upstream

import "net"

// batchSize is how much a batchConn holds before it writes: a 100 KB
// message goes out in two writes, not the 25 that go-smtp's 4 KiB buffer
// makes.
const batchSize = 64 << 10

// batchConn holds what the SMTP client writes until it reads, or until
// batchSize is held. The client always reads a reply after what it
// writes, so nothing waits in the buffer for the upstream: what changes
// is that the message, which go-smtp's dot-stuffing writer hands down in
// 4 KiB pieces, leaves in few large writes (and, above TLS, in few large
// records), each a system call and a trip through the kernel's network
// stack fewer.
type batchConn struct {
	net.Conn
	buf []byte
	err error // the first failed write; every later write and read fails with it
}

func newBatchConn(c net.Conn) *batchConn { return &batchConn{Conn: c} }

func (c *batchConn) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	if len(c.buf)+len(p) > batchSize {
		if err := c.flush(); err != nil {
			return 0, err
		}
		if len(p) >= batchSize {
			return c.write(p)
		}
	}
	if c.buf == nil {
		c.buf = make([]byte, 0, batchSize)
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

func (c *batchConn) Read(p []byte) (int, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

func (c *batchConn) flush() error {
	if c.err != nil {
		return c.err
	}
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.write(c.buf)
	c.buf = c.buf[:0]
	return err
}

func (c *batchConn) write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if err != nil {
		c.err = err
	}
	return n, err
}
