package config

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"time"

	"smarthost/internal/bytesize"
)

// table reads one TOML table. Each accessor marks its key as known and
// records an Error for a value of the wrong type or range, so one
// pass reports every problem; done reports the keys nobody asked for.
type table struct {
	errs *Errors
	// secrets chooses the secrets the parse reads; nil reads all.
	secrets SecretFilter
	path    string // "listen[0]"; "" for the root table
	// label names a table of an array by its name, once read (uniqueName),
	// at the end of each of its messages: `[upstream "gmail"]`.
	label string
	m     map[string]any
	used  map[string]bool
}

func newTable(errs *Errors, secrets SecretFilter, path string, m map[string]any) *table {
	return &table{errs: errs, secrets: secrets, path: path, m: m, used: map[string]bool{}}
}

// key is the full name of a key of this table, as shown in errors.
func (t *table) key(k string) string {
	if t.path == "" {
		return k
	}
	return t.path + "." + k
}

func (t *table) errorf(k, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if t.label != "" {
		msg += " [" + t.label + "]"
	}
	*t.errs = append(*t.errs, Error{Key: t.key(k), Msg: msg})
}

func (t *table) get(k string) (any, bool) {
	t.used[k] = true
	v, ok := t.m[k]
	return v, ok
}

// has reports whether k is present, whatever its type.
func (t *table) has(k string) bool {
	_, ok := t.get(k)
	return ok
}

func (t *table) typeError(k, want string, v any) {
	t.errorf(k, "must be %s, not %s", want, tomlType(v))
}

// value returns the value at k as a T. present is false when k is
// absent; ok is false then, and when the value is of another type, which
// is recorded as not being want.
func value[T any](t *table, k, want string) (v T, present, ok bool) {
	raw, present := t.get(k)
	if !present {
		return v, false, false
	}
	v, ok = raw.(T)
	if !ok {
		t.typeError(k, want, raw)
	}
	return v, true, ok
}

// uniqueName reads the required "name" key and checks it against the names
// of the earlier tables of the same kind in seen.
func (t *table) uniqueName(seen map[string]string) string {
	name, ok := t.str("name")
	switch {
	case !ok:
		if !t.has("name") {
			t.errorf("name", "required")
		}
	case name == "":
		t.errorf("name", "must not be empty")
	default:
		if prev, dup := seen[name]; dup {
			t.errorf("name", "%q is already used by %s", name, prev)
		} else {
			seen[name] = t.path
		}
		kind, _, _ := strings.Cut(t.path, "[")
		t.label = fmt.Sprintf("%s %q", kind, name)
	}
	return name
}

// str returns the string at k; ok is false when k is absent or not a
// string (the latter is recorded).
func (t *table) str(k string) (string, bool) {
	s, _, ok := value[string](t, k, "a string")
	return s, ok
}

func (t *table) strDefault(k, def string) string {
	if s, ok := t.str(k); ok {
		return s
	}
	return def
}

func (t *table) boolean(k string, def bool) bool {
	if b, _, ok := value[bool](t, k, "true or false"); ok {
		return b
	}
	return def
}

func (t *table) integer(k string, def, minimum int) int {
	n, _, ok := value[int64](t, k, "an integer")
	if !ok {
		return def
	}
	if n < int64(minimum) || n > math.MaxInt32 {
		t.errorf(k, "%d is out of range (%d to %d)", n, minimum, math.MaxInt32)
		return def
	}
	return int(n)
}

// duration reads a Go duration string ("90s", "1m", "120h"); it must be
// positive.
func (t *table) duration(k string, def time.Duration) time.Duration {
	s, present, ok := value[string](t, k, `a duration string such as "90s", "1m" or "120h"`)
	switch {
	case !present:
		return def
	case !ok:
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.errorf(k, `%q is not a duration such as "90s", "1m" or "120h"`, s)
		return 0
	}
	if d <= 0 {
		t.errorf(k, "%q must be positive", s)
		return 0
	}
	return d
}

// ParseSize parses a byte size such as "25MB" (see bytesize.Parse).
func ParseSize(s string) (int64, error) { return bytesize.Parse(s) }

// size reads a byte size: a string for ParseSize or a plain integer.
func (t *table) size(k string, def int64) int64 {
	v, present := t.get(k)
	if !present {
		return def
	}
	var n int64
	switch v := v.(type) {
	case int64:
		n = v
	case string:
		var err error
		if n, err = ParseSize(v); err != nil {
			t.errorf(k, "%v", err)
			return 0
		}
	default:
		t.typeError(k, `a size such as "25MB"`, v)
		return 0
	}
	if n <= 0 {
		t.errorf(k, "must be positive")
		return 0
	}
	return n
}

// strings reads an array of strings; each bad element is reported under
// its index and left out. ok is false when k is absent or not an array.
func (t *table) strings(k string) ([]string, bool) {
	arr, _, ok := value[[]any](t, k, "an array of strings")
	if !ok {
		return nil, false
	}
	out := make([]string, 0, len(arr))
	for i, e := range arr {
		s, ok := e.(string)
		if !ok {
			t.errorf(fmt.Sprintf("%s[%d]", k, i), "must be a string, not %s", tomlType(e))
			continue
		}
		out = append(out, s)
	}
	return out, true
}

// missingList reports whether k is absent or an empty array; a value of
// another type has already been reported by the accessor.
func (t *table) missingList(k string) bool {
	v, present := t.get(k)
	arr, isArr := v.([]any)
	return !present || isArr && len(arr) == 0
}

// sub returns the table at k, empty when absent or of the wrong type.
func (t *table) sub(k string) *table {
	v, present := t.get(k)
	m, ok := v.(map[string]any)
	if present && !ok {
		t.typeError(k, "a table", v)
	}
	return newTable(t.errs, t.secrets, t.key(k), m)
}

// tables returns the array of tables at k ([[k]] or k = [{...}]).
func (t *table) tables(k string) []*table {
	v, present := t.get(k)
	if !present {
		return nil
	}
	var elems []any
	switch v := v.(type) {
	case []map[string]any:
		for _, m := range v {
			elems = append(elems, m)
		}
	case []any:
		elems = v
	default:
		t.typeError(k, fmt.Sprintf("an array of tables ([[%s]])", k), v)
		return nil
	}
	var out []*table
	for i, e := range elems {
		key := fmt.Sprintf("%s[%d]", k, i)
		m, ok := e.(map[string]any)
		if !ok {
			t.errorf(key, "must be a table, not %s", tomlType(e))
			continue
		}
		out = append(out, newTable(t.errs, t.secrets, t.key(key), m))
	}
	return out
}

// readFile returns the contents of a file named by key k, or nil after
// recording why it cannot be read.
func (t *table) readFile(k, path string) []byte {
	if path == "" {
		t.errorf(k, "must not be empty")
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.errorf(k, "%v", err)
		return nil
	}
	if data == nil {
		data = []byte{}
	}
	return data
}

// done reports every key of the table that no accessor asked for, so
// that typos do not pass silently.
func (t *table) done() {
	var unknown []string
	for k := range t.m {
		if !t.used[k] {
			unknown = append(unknown, k)
		}
	}
	slices.Sort(unknown)
	for _, k := range unknown {
		if near := t.nearestKey(k); near != "" {
			t.errorf(k, "unknown key; did you mean %s?", near)
			continue
		}
		t.errorf(k, "unknown key")
	}
}

// nearestKey is the known key of t closest to k, a typo away: at most
// two edits, and fewer than a third of its length.
func (t *table) nearestKey(k string) string {
	best, bestD := "", 3
	for known := range t.used {
		if _, present := t.m[known]; present {
			continue
		}
		d := editDistance(k, known)
		if d*3 >= len(known) {
			continue
		}
		if d < bestD || d == bestD && known < best {
			best, bestD = known, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev, cur := make([]int, len(b)+1), make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// tomlType names the TOML type of a decoded value for error messages.
func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any:
		return "an array"
	case []map[string]any:
		return "an array of tables"
	case map[string]any:
		return "a table"
	case time.Time:
		return "a date/time"
	default:
		return fmt.Sprintf("%T", v)
	}
}
