package queue

import (
	"bytes"
	"io"
)

// Body is a queued message's content as a delivery reads it: the head,
// the bytes stored with its record, and for a message spooled at the door
// the rest, read from its spool file as it is sent rather than loaded
// into memory. The Body that Deliver and Bounce get is valid only until
// they return.
type Body struct {
	head []byte
	rest *io.SectionReader // the spool file's content; nil when head is all of it
}

// NewBody returns the Body of a content held whole in memory.
func NewBody(content []byte) Body { return Body{head: content} }

// Head returns the first bytes of the content: all of it for a message
// stored whole, else at least its header section and the empty line that
// ends it. It must not be changed.
func (b Body) Head() []byte { return b.head }

// Size returns the length of the whole content.
func (b Body) Size() int64 {
	n := int64(len(b.head))
	if b.rest != nil {
		n += b.rest.Size()
	}
	return n
}

// Reader returns a new reader of the whole content from its first byte.
// Readers are independent, so each upstream tried in one attempt reads
// the message from the start. Reading a spooled message can fail (a disk
// error); content that ends short of Size is io.ErrUnexpectedEOF, never
// a shorter message.
func (b Body) Reader() io.Reader {
	if b.rest == nil {
		return bytes.NewReader(b.head)
	}
	file := &exactReader{r: io.NewSectionReader(b.rest, 0, b.rest.Size()), left: b.rest.Size()}
	return io.MultiReader(bytes.NewReader(b.head), file)
}

// WithHead returns the Body whose head is head instead of b's, followed by
// the same rest: for a change to the header section, which the head
// always holds.
func (b Body) WithHead(head []byte) Body {
	b.head = head
	return b
}

// exactReader reads left bytes from r and calls an early end an error: a
// spool file that shrank after it was opened must not become a truncated
// message at the upstream.
type exactReader struct {
	r    io.Reader
	left int64
}

func (e *exactReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}
