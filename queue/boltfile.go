package queue

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/bits"
	"strconv"
	"strings"
)

// bbolt reads its file through a memory map and trusts what it finds: a
// page past the end of a truncated file is a SIGBUS, a page number or an
// element offset that points elsewhere is a fault or a panic, and bbolt's
// own check (Tx.Check) walks the same map from a goroutine of its own,
// where neither can be recovered, and can loop on a cycle of pages. So
// before a file is handed to bbolt, boltFile reads it with ReadAt, page by
// page, and checks every number against the file before using it: a
// damaged file gives a list of problems, never a fault, a panic or a
// loop. salvage.go reads what is still readable through the same walk.
//
// The layout read here is bbolt's file format, version 2 (bbolt's
// internal/common: page.go, meta.go, bucket.go), which bbolt keeps
// unchanged across releases; FuzzCheckFile and the tests in check_test.go
// hold this reader to bbolt's writer.

// bbolt's file format. Integers are in the machine's byte order, as bbolt
// writes them.
const (
	boltMagic   = 0xED0CDAED
	boltVersion = 2

	pageHeaderSize   = 16 // id u64, flags u16, count u16, overflow u32
	elemSize         = 16 // branch: pos u32, ksize u32, pgid u64; leaf: flags u32, pos u32, ksize u32, vsize u32
	bucketHeaderSize = 16 // root pgid u64, sequence u64
	metaSize         = 64 // magic, version, page size, flags u32; root bucket; freelist, pgid, txid, checksum u64
	metaSumSize      = 56 // the checksum covers the meta up to itself

	branchPageFlag   = 0x01
	leafPageFlag     = 0x02
	freelistPageFlag = 0x10
	bucketLeafFlag   = 0x01

	noFreelist = ^uint64(0)
)

// Limits that no file bbolt writes comes near, so that a damaged number
// cannot make the reader allocate or recurse without bound.
const (
	minPageSize = 512
	maxPageSize = 1 << 20
	// maxTreeDepth bounds the nesting of pages and buckets: a B+tree of
	// 2^64 pages with two keys per page is 64 deep.
	maxTreeDepth = 64
)

var boltOrder = binary.NativeEndian

// boltMeta is a valid meta page.
type boltMeta struct {
	page     int // 0 or 1
	pageSize int
	root     uint64 // page of the root bucket
	freelist uint64 // page of the freelist, or noFreelist
	hwm      uint64 // high-water mark: the pages in use are below it
	txid     uint64
}

// parseMeta decodes the meta page that starts b, as bbolt validates it:
// magic, version and checksum.
func parseMeta(b []byte) (boltMeta, error) {
	if len(b) < pageHeaderSize+metaSize {
		return boltMeta{}, errors.New("too short")
	}
	m := b[pageHeaderSize : pageHeaderSize+metaSize]
	switch {
	case boltOrder.Uint32(m[0:]) != boltMagic:
		return boltMeta{}, errors.New("not a bbolt meta page (magic)")
	case boltOrder.Uint32(m[4:]) != boltVersion:
		return boltMeta{}, fmt.Errorf("unknown version %d", boltOrder.Uint32(m[4:]))
	}
	h := fnv.New64a()
	h.Write(m[:metaSumSize])
	if h.Sum64() != boltOrder.Uint64(m[metaSumSize:]) {
		return boltMeta{}, errors.New("checksum mismatch")
	}
	return boltMeta{
		pageSize: int(boltOrder.Uint32(m[8:])),
		root:     boltOrder.Uint64(m[16:]),
		freelist: boltOrder.Uint64(m[32:]),
		hwm:      boltOrder.Uint64(m[40:]),
		txid:     boltOrder.Uint64(m[48:]),
	}, nil
}

// boltFile is a bbolt file opened for reading, with the meta page that
// bbolt would use: of the two, the valid one with the higher transaction
// ID (the other is the previous commit, or one torn by a crash).
type boltFile struct {
	r    io.ReaderAt
	data []byte // the file mapped, if it is: then r is not read past the meta pages
	size int64
	meta boltMeta
	// metaErr says why the other meta page is not valid, if it is not.
	metaErr error
}

// readBoltFile reads the meta pages of the file r of size bytes and checks
// them against the file: the page size, the high-water mark against the
// size, the root and freelist pages below it. An error means the file
// cannot be read at all; problems, that the meta page is inconsistent
// with the file (a truncated file: its pages past the end are lost).
func readBoltFile(r io.ReaderAt, size int64) (f *boltFile, problems []string, err error) {
	f = &boltFile{r: r, size: size}
	read := func(off int64) (boltMeta, error) {
		var b [pageHeaderSize + metaSize]byte
		if _, err := r.ReadAt(b[:], off); err != nil {
			return boltMeta{}, fmt.Errorf("read at %d: %w", off, err)
		}
		return parseMeta(b[:])
	}
	// The page size is in the meta pages. Where the first is damaged,
	// bbolt looks for the second at every page size it could have; so
	// does this.
	var metas [2]boltMeta
	var errs [2]error
	metas[0], errs[0] = read(0)
	pageSize := metas[0].pageSize
	if errs[0] != nil {
		pageSize = 0
		for i := range 15 {
			off := int64(1024) << i
			if off >= size-1024 {
				break
			}
			if m, err := read(off); err == nil {
				pageSize = m.pageSize
				break
			}
		}
	}
	if pageSize != 0 {
		metas[1], errs[1] = read(int64(pageSize))
	} else {
		errs[1] = errors.New("not found at any page size")
	}
	metas[1].page = 1
	if errs[0] != nil && errs[1] != nil {
		return nil, nil, fmt.Errorf("neither meta page is valid (page 0: %v; page 1: %v): not a bbolt file, or both were overwritten", errs[0], errs[1])
	}
	use, other := 0, 1
	if errs[0] != nil || (errs[1] == nil && metas[1].txid > metas[0].txid) {
		use, other = 1, 0
	}
	f.meta, f.metaErr = metas[use], errs[other]
	m := f.meta
	at := fmt.Sprintf("meta page %d (transaction %d)", m.page, m.txid)
	if errs[other] == nil && metas[other].pageSize != m.pageSize {
		return nil, nil, fmt.Errorf("the meta pages disagree on the page size: %d and %d", metas[0].pageSize, metas[1].pageSize)
	}
	if m.pageSize < minPageSize || m.pageSize > maxPageSize || bits.OnesCount(uint(m.pageSize)) != 1 {
		return nil, nil, fmt.Errorf("%s gives a page size of %d", at, m.pageSize)
	}
	ps := uint64(m.pageSize)
	if m.hwm < 4 || m.hwm > uint64(1<<62)/ps {
		return nil, nil, fmt.Errorf("%s gives %d pages", at, m.hwm)
	}
	if need := m.hwm * ps; uint64(size) < need {
		problems = append(problems, fmt.Sprintf("the file is %d bytes, but its last commit (%s) needs %d (%d pages of %d bytes): it was cut short",
			size, at, need, m.hwm, ps))
	}
	if m.root < 2 || m.root >= m.hwm {
		problems = append(problems, fmt.Sprintf("%s puts the root at page %d, outside pages 2 to %d", at, m.root, m.hwm-1))
	}
	if m.freelist != noFreelist && (m.freelist < 2 || m.freelist >= m.hwm) {
		problems = append(problems, fmt.Sprintf("%s puts the freelist at page %d, outside pages 2 to %d", at, m.freelist, m.hwm-1))
	}
	return f, problems, nil
}

// pages returns the number of pages of the file in use: the high-water mark.
func (f *boltFile) pages() uint64 { return f.meta.hwm }

// node returns page id with its overflow pages, after checking that they
// lie within the pages in use and within the file, and that the page says
// it is page id. From a mapped file it is a slice of the map, which must
// not be written; else it is read into buf, grown as needed.
func (f *boltFile) node(id uint64, buf []byte) ([]byte, error) {
	ps := uint64(f.meta.pageSize)
	if id < 2 || id >= f.meta.hwm {
		return buf, fmt.Errorf("page %d is outside pages 2 to %d", id, f.meta.hwm-1)
	}
	b, err := f.span(int64(id*ps), int(ps), buf)
	if err != nil {
		return b, fmt.Errorf("page %d: %w", id, err)
	}
	if got := boltOrder.Uint64(b); got != id {
		return b, fmt.Errorf("page %d says it is page %d", id, got)
	}
	overflow := uint64(boltOrder.Uint32(b[12:]))
	if overflow >= f.meta.hwm-id {
		return b, fmt.Errorf("page %d runs over %d more pages, past the last page %d", id, overflow, f.meta.hwm-1)
	}
	if overflow > 0 {
		if b, err = f.span(int64(id*ps), int((overflow+1)*ps), b); err != nil {
			return b, fmt.Errorf("page %d (%d overflow pages): %w", id, overflow, err)
		}
	}
	return b, nil
}

// span returns the n bytes of the file at off: a slice of the map, or
// read into buf.
func (f *boltFile) span(off int64, n int, buf []byte) ([]byte, error) {
	if off+int64(n) > f.size {
		return buf, fmt.Errorf("past the end of the file (%d bytes)", f.size)
	}
	if f.data != nil {
		return f.data[off : off+int64(n) : off+int64(n)], nil
	}
	buf = grow(buf, n)
	if _, err := f.r.ReadAt(buf[:n], off); err != nil {
		return buf, err
	}
	return buf[:n], nil
}

// grow returns b with a length of at least n, keeping its content.
func grow(b []byte, n int) []byte {
	if cap(b) >= n {
		return b[:n]
	}
	nb := make([]byte, n)
	copy(nb, b)
	return nb
}

// pageElem is an element of a branch or leaf page: key, and either the
// child page (branch) or the flags and value (leaf).
type pageElem struct {
	key, value []byte
	child      uint64
	flags      uint32
}

// pageElems decodes the elements of the page that starts b (the page with
// its overflow, or an inline bucket's page) into out, checking that each
// key and value lies within b.
func pageElems(b []byte, leaf bool, out []pageElem) ([]pageElem, error) {
	count := int(boltOrder.Uint16(b[10:]))
	if pageHeaderSize+count*elemSize > len(b) {
		return out, fmt.Errorf("%d elements do not fit in %d bytes", count, len(b))
	}
	out = out[:0]
	for i := range count {
		off := pageHeaderSize + i*elemSize
		e := b[off : off+elemSize]
		var pos, ksize, vsize uint64
		var el pageElem
		if leaf {
			el.flags = boltOrder.Uint32(e)
			pos, ksize, vsize = uint64(boltOrder.Uint32(e[4:])), uint64(boltOrder.Uint32(e[8:])), uint64(boltOrder.Uint32(e[12:]))
		} else {
			pos, ksize = uint64(boltOrder.Uint32(e)), uint64(boltOrder.Uint32(e[4:]))
			el.child = boltOrder.Uint64(e[8:])
		}
		start := uint64(off) + pos
		if end := start + ksize + vsize; end > uint64(len(b)) {
			return out, fmt.Errorf("element %d (key of %d bytes, value of %d at offset %d) runs past the page's %d bytes", i, ksize, vsize, start, len(b))
		}
		if ksize == 0 {
			return out, fmt.Errorf("element %d has an empty key", i)
		}
		if leaf && el.flags&^bucketLeafFlag != 0 {
			return out, fmt.Errorf("element %d has unknown flags %#x", i, el.flags)
		}
		el.key = b[start : start+ksize]
		el.value = b[start+ksize : start+ksize+vsize]
		out = append(out, el)
	}
	return out, nil
}

// boltWalk walks the tree of buckets of a boltFile, checking every page
// it reads. Each page is read once: a page reached twice (a cycle, or two
// parents) is a problem and is not read again.
type boltWalk struct {
	f *boltFile
	// visit, if set, receives every key and value outside of a bucket
	// key, with the path of its bucket ("msgs", "a/b"). key and value are
	// only valid during the call.
	visit func(bucket string, key, value []byte)
	// stopAfter ends the walk once that many problems are found; 0 walks
	// on past every problem (salvage).
	stopAfter int
	// skip, if set, names buckets not to walk now: their headers are kept
	// in skipped, for bucket to walk them later (salvage reads the bodies
	// once it has the records).
	skip    func(bucket string) bool
	skipped map[string][]byte
	// damaged records the buckets in which problems were found.
	damaged map[string]bool

	used, free bitset
	bufs       [maxTreeDepth + 1][]byte
	elems      [maxTreeDepth + 1][]pageElem
	problems   []string
}

// problem records a problem found in bucket.
func (w *boltWalk) problem(bucket string, format string, args ...any) {
	if w.damaged == nil {
		w.damaged = make(map[string]bool)
	}
	w.damaged[bucket] = true
	if bucket == "" {
		bucket = "(root)"
	}
	w.problems = append(w.problems, "bucket "+bucket+": "+fmt.Sprintf(format, args...))
}

func (w *boltWalk) stopped() bool { return w.stopAfter > 0 && len(w.problems) >= w.stopAfter }

// walk checks the whole file: the freelist, then every bucket from the
// root, then that every page is either in use or free.
func (w *boltWalk) walk() {
	n := w.start()
	if w.stopped() {
		return
	}
	w.tree("", w.f.meta.root, nil, nil, 0)
	if w.f.meta.freelist == noFreelist || w.stopped() {
		return
	}
	// With a freelist written, every page below the high-water mark is
	// either in use or listed free; bbolt's own check asks the same.
	var lost []uint64
	for id := uint64(2); id < n; id++ {
		if !w.used.has(id) && !w.free.has(id) {
			lost = append(lost, id)
		}
	}
	if len(lost) > 0 {
		w.problems = append(w.problems, fmt.Sprintf("%d pages are neither in use nor free (%s)", len(lost), pageList(lost)))
	}
}

// top checks only what bbolt itself reads when it opens the file: the
// freelist, and the root bucket's page, without the pages below it.
func (w *boltWalk) top() {
	w.start()
	if w.stopped() {
		return
	}
	id := w.f.meta.root
	b, err := w.f.node(id, w.bufs[0])
	w.bufs[0] = b
	if err != nil {
		w.problem("", "%v", err)
		return
	}
	flags := boltOrder.Uint16(b[8:])
	if flags != branchPageFlag && flags != leafPageFlag {
		w.problem("", "page %d has flags %#x, neither a branch nor a leaf", id, flags)
		return
	}
	elems, err := pageElems(b, flags == leafPageFlag, w.elems[0])
	w.elems[0] = elems
	if err != nil {
		w.problem("", "page %d: %v", id, err)
		return
	}
	w.ordered("", id, elems, nil, nil)
}

// start makes the sets of pages in use and free, and reads the freelist
// if the last commit wrote one. It returns the number of pages the sets
// hold.
func (w *boltWalk) start() uint64 {
	f := w.f
	// Pages past the end of a cut-short file cannot be read: the sets
	// need not hold them, whatever the meta page says.
	n := min(f.pages(), uint64(f.size)/uint64(f.meta.pageSize)+1)
	w.used, w.free = newBitset(n), newBitset(n)
	w.used.set(0)
	w.used.set(1)
	if f.meta.freelist != noFreelist {
		w.readFreelist()
	}
	return n
}

// readFreelist reads the freelist page and marks the pages it lists free.
func (w *boltWalk) readFreelist() {
	id := w.f.meta.freelist
	b, err := w.f.node(id, w.bufs[0])
	w.bufs[0] = b
	if err != nil {
		w.problems = append(w.problems, "freelist: "+err.Error())
		return
	}
	if flags := boltOrder.Uint16(b[8:]); flags != freelistPageFlag {
		w.problems = append(w.problems, fmt.Sprintf("freelist: page %d has flags %#x, not a freelist's", id, flags))
		return
	}
	w.mark("freelist", id, len(b)/w.f.meta.pageSize)
	start, count := uint64(pageHeaderSize), uint64(boltOrder.Uint16(b[10:]))
	if count == 0xFFFF { // the count is in the first element
		if len(b) < pageHeaderSize+8 {
			w.problems = append(w.problems, "freelist: too short for its count")
			return
		}
		count, start = boltOrder.Uint64(b[pageHeaderSize:]), pageHeaderSize+8
	}
	if count > (uint64(len(b))-start)/8 {
		w.problems = append(w.problems, fmt.Sprintf("freelist: %d free pages do not fit in its %d bytes", count, len(b)))
		return
	}
	for i := range count {
		p := boltOrder.Uint64(b[start+8*i:])
		switch {
		case p < 2 || p >= w.f.pages():
			w.problems = append(w.problems, fmt.Sprintf("freelist: lists page %d, outside pages 2 to %d", p, w.f.pages()-1))
			return
		case w.free.has(p):
			w.problems = append(w.problems, fmt.Sprintf("freelist: lists page %d twice", p))
			return
		case w.used.has(p):
			w.problems = append(w.problems, fmt.Sprintf("freelist: lists page %d, which holds the freelist itself", p))
			return
		}
		w.free.set(p)
	}
}

// mark records that the n pages from id are in use. It reports a page
// listed free, and returns false for a page already in use: reached twice,
// it is not read again, so that a cycle ends there.
func (w *boltWalk) mark(bucket string, id uint64, n int) bool {
	for p := id; p < id+uint64(n); p++ {
		if w.used.has(p) {
			w.problem(bucket, "page %d is reached twice", p)
			return false
		}
		if w.free.has(p) {
			// The freelist's fault as likely as the bucket's: the page is
			// read all the same.
			w.problems = append(w.problems, fmt.Sprintf("freelist: lists page %d, which bucket %q uses", p, bucket))
		}
		w.used.set(p)
	}
	return true
}

// tree checks the subtree of bucket rooted at page id, whose keys must lie
// in [lo, hi) (nil: unbounded), at depth in the walk. Keys and values it
// finds go to visit; nested buckets are walked as they come.
func (w *boltWalk) tree(bucket string, id uint64, lo, hi []byte, depth int) {
	if w.stopped() {
		return
	}
	if depth > maxTreeDepth {
		w.problem(bucket, "page %d is nested %d deep", id, depth)
		return
	}
	b, err := w.f.node(id, w.bufs[depth])
	w.bufs[depth] = b
	if err != nil {
		w.problem(bucket, "%v", err)
		return
	}
	if !w.mark(bucket, id, len(b)/w.f.meta.pageSize) {
		return
	}
	flags := boltOrder.Uint16(b[8:])
	if flags != branchPageFlag && flags != leafPageFlag {
		w.problem(bucket, "page %d has flags %#x, neither a branch nor a leaf", id, flags)
		return
	}
	leaf := flags == leafPageFlag
	elems, err := pageElems(b, leaf, w.elems[depth])
	w.elems[depth] = elems
	if err != nil {
		w.problem(bucket, "page %d: %v", id, err)
		return
	}
	if !w.ordered(bucket, id, elems, lo, hi) {
		return
	}
	if !leaf {
		if len(elems) == 0 {
			w.problem(bucket, "page %d is a branch without elements", id)
			return
		}
		for i, e := range elems {
			next := hi
			if i+1 < len(elems) {
				next = elems[i+1].key
			}
			w.tree(bucket, e.child, e.key, next, depth+1)
		}
		return
	}
	w.leaf(bucket, id, elems, depth)
}

// leaf hands the elements of a leaf page (or an inline bucket) to visit
// and walks the buckets among them.
func (w *boltWalk) leaf(bucket string, id uint64, elems []pageElem, depth int) {
	for _, e := range elems {
		if w.stopped() {
			return
		}
		if e.flags&bucketLeafFlag == 0 {
			if w.visit != nil {
				w.visit(bucket, e.key, e.value)
			}
			continue
		}
		name := string(e.key)
		if bucket != "" {
			name = bucket + "/" + name
		}
		if w.skip != nil && w.skip(name) {
			if w.skipped == nil {
				w.skipped = make(map[string][]byte)
			}
			w.skipped[name] = bytes.Clone(e.value)
			continue
		}
		w.bucket(name, e.value, id, depth+1)
	}
}

// bucket walks the bucket name, whose header (and inline page, if any) is
// value, found in page id, at depth.
func (w *boltWalk) bucket(name string, value []byte, id uint64, depth int) {
	if len(value) < bucketHeaderSize {
		w.problem(name, "its header in page %d is %d bytes, not %d", id, len(value), bucketHeaderSize)
		return
	}
	if root := boltOrder.Uint64(value); root != 0 {
		w.tree(name, root, nil, nil, depth)
		return
	}
	// An inline bucket: its one leaf page is in the value.
	if depth > maxTreeDepth {
		w.problem(name, "nested %d deep", depth)
		return
	}
	inline := value[bucketHeaderSize:]
	if len(inline) < pageHeaderSize {
		w.problem(name, "its inline page in page %d is %d bytes", id, len(inline))
		return
	}
	if flags := boltOrder.Uint16(inline[8:]); flags != leafPageFlag {
		w.problem(name, "its inline page in page %d has flags %#x, not a leaf's", id, flags)
		return
	}
	sub, err := pageElems(inline, true, w.elems[depth])
	w.elems[depth] = sub
	if err != nil {
		w.problem(name, "its inline page in page %d: %v", id, err)
		return
	}
	if w.ordered(name, id, sub, nil, nil) {
		w.leaf(name, id, sub, depth)
	}
}

// ordered reports whether the keys of elems increase strictly within
// [lo, hi), as bbolt's search needs, and records a problem if not.
func (w *boltWalk) ordered(bucket string, id uint64, elems []pageElem, lo, hi []byte) bool {
	if err := keyOrder(elems, lo, hi); err != nil {
		w.problem(bucket, "page %d: %v", id, err)
		return false
	}
	return true
}

func keyOrder(elems []pageElem, lo, hi []byte) error {
	for i, e := range elems {
		switch {
		case i == 0 && lo != nil && bytes.Compare(e.key, lo) < 0:
			return fmt.Errorf("its first key %x sorts before its parent's %x", e.key, lo)
		case i > 0 && bytes.Compare(elems[i-1].key, e.key) >= 0:
			return fmt.Errorf("key %d (%x) does not sort after key %d (%x)", i, e.key, i-1, elems[i-1].key)
		case hi != nil && bytes.Compare(e.key, hi) >= 0:
			return fmt.Errorf("key %d (%x) does not sort before its parent's next key %x", i, e.key, hi)
		}
	}
	return nil
}

// scanLeaves hands fn the elements of every sound leaf page of the file
// that the walk did not reach, whatever its bucket. Such a page is either
// under a damaged page (current), or one that bbolt freed (an old version
// of what it held): fn cannot tell which. Pages past the end of a cut
// file are not read.
func (w *boltWalk) scanLeaves(fn func(elems []pageElem)) {
	n := min(w.f.pages(), uint64(w.f.size)/uint64(w.f.meta.pageSize))
	for id := uint64(2); id < n; id++ {
		if w.used.has(id) {
			continue
		}
		b, err := w.f.node(id, w.bufs[0])
		w.bufs[0] = b
		if err != nil || boltOrder.Uint16(b[8:]) != leafPageFlag {
			continue // an overflow page, a branch, free space, garbage
		}
		elems, err := pageElems(b, true, w.elems[0])
		w.elems[0] = elems
		if err == nil && keyOrder(elems, nil, nil) == nil {
			fn(elems)
		}
	}
}

// bitset is a set of page numbers below a bound; those past it are
// never in it.
type bitset []uint64

func newBitset(n uint64) bitset { return make(bitset, (n+63)/64) }

func (s bitset) set(i uint64) {
	if i/64 < uint64(len(s)) {
		s[i/64] |= 1 << (i % 64)
	}
}

func (s bitset) has(i uint64) bool { return i/64 < uint64(len(s)) && s[i/64]&(1<<(i%64)) != 0 }

// pageList shows the first few of ids.
func pageList(ids []uint64) string {
	const show = 5
	var parts []string
	for i, id := range ids {
		if i == show {
			parts = append(parts, fmt.Sprintf("… %d more", len(ids)-show))
			break
		}
		parts = append(parts, strconv.FormatUint(id, 10))
	}
	return "pages " + strings.Join(parts, ", ")
}
