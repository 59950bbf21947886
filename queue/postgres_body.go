package queue

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// OpenBody implements Backend: the head that a was claimed with and, for
// a spooled message, a reader of its chunks that fetches one at a time
// from the pool, outside any transaction. Chunks missing (the message
// deleted meanwhile) fail the attempt with an error that wraps
// fs.ErrNotExist.
func (s *PGStore) OpenBody(a Attempt) (b Body, close func(), err error) {
	head := NewBody(a.head)
	if !a.spooled {
		return head, func() {}, nil
	}
	id := a.Message.ID
	ctx, cancel := opContext()
	defer cancel()
	var chunks, size int64
	err = s.pool.QueryRow(ctx, `SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM queue_bodies
		WHERE id = $1 AND seq > 0`, id).Scan(&chunks, &size)
	switch {
	case err != nil:
		return head, func() {}, fmt.Errorf("queue: open content of %s: %w", id, err)
	case chunks == 0 || chunks != (size+pgChunk-1)/pgChunk:
		return head, func() {}, fmt.Errorf("queue: open content of %s: %d chunks of %d bytes: %w", id, chunks, size, fs.ErrNotExist)
	}
	r := &chunkReader{pool: s.pool, id: id, size: size}
	return Body{head: a.head, rest: io.NewSectionReader(r, 0, size)}, r.drop, nil
}

// Content implements Backend: the head and the record's spooled flag read
// in one query, then the chunks as for an attempt.
func (s *PGStore) Content(id string) (b Body, close func(), err error) {
	ctx, cancel := opContext()
	defer cancel()
	var v, head []byte
	err = s.pool.QueryRow(ctx, `SELECT m.record, b.data FROM queue_messages m
		JOIN queue_bodies b ON b.id = m.id AND b.seq = 0 WHERE m.id = $1`, id).Scan(&v, &head)
	if errors.Is(err, pgx.ErrNoRows) {
		err = ErrNotFound
	}
	var rec *record
	if err == nil {
		rec, err = decodeRecord(v)
	}
	if err != nil {
		return Body{}, func() {}, fmt.Errorf("queue: content of %s: %w", id, err)
	}
	return s.OpenBody(Attempt{Message: Message{ID: id}, head: head, spooled: rec.Spooled})
}

// chunkReader reads a message's content past its head, chunks 1…, by
// offset. It keeps the last chunk it fetched, which a reader reading in
// order reads from pgChunk bytes at a time.
type chunkReader struct {
	pool *pgxpool.Pool
	id   string
	size int64

	mu   sync.Mutex
	seq  int // of data; 0 for none
	data []byte
}

func (r *chunkReader) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for n < len(p) {
		if off >= r.size {
			return n, io.EOF
		}
		seq := 1 + int(off/pgChunk)
		if r.seq != seq {
			if err := r.fetch(seq); err != nil {
				return n, err
			}
		}
		at := int(off % pgChunk)
		if at >= len(r.data) {
			return n, fmt.Errorf("queue: content of %s: chunk %d is short: %w", r.id, seq, io.ErrUnexpectedEOF)
		}
		k := copy(p[n:], r.data[at:])
		n += k
		off += int64(k)
	}
	return n, nil
}

func (r *chunkReader) fetch(seq int) error {
	ctx, cancel := opContext()
	defer cancel()
	var data []byte
	err := r.pool.QueryRow(ctx, `SELECT data FROM queue_bodies WHERE id = $1 AND seq = $2`, r.id, seq).Scan(&data)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("queue: content of %s: chunk %d: %w", r.id, seq, fs.ErrNotExist)
	}
	if err != nil {
		return fmt.Errorf("queue: content of %s: chunk %d: %w", r.id, seq, err)
	}
	r.seq, r.data = seq, data
	return nil
}

// drop lets the chunk kept go once the attempt is over.
func (r *chunkReader) drop() {
	r.mu.Lock()
	r.seq, r.data = 0, nil
	r.mu.Unlock()
}
