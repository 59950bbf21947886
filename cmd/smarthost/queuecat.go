package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// cat is `smarthost queue cat ID`: the message's content as it will be
// sent, streamed from the API. To a terminal, control characters are
// shown escaped (a message may carry escape sequences that would drive
// the terminal); to a file or a pipe, the bytes are written exactly.
func (c *queueClient) cat(id string, headers bool, stdout io.Writer) error {
	path := "/api/queue/" + url.PathEscape(id) + "/content"
	if headers {
		path += "?headers=1"
	}
	req, err := http.NewRequest(http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if isTerminal(stdout) {
		err = copyEscaped(stdout, resp.Body)
	} else {
		_, err = io.Copy(stdout, resp.Body)
	}
	if err != nil {
		return fmt.Errorf("content of %s: %w", printable(id), err)
	}
	return nil
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// copyEscaped copies r to w line by line, each line's control characters
// (but tab) and invalid UTF-8 shown as Go escapes ("\x1b", "\u009b",
// "\xff"), its CRLF or LF ending kept as a newline.
func copyEscaped(w io.Writer, r io.Reader) error {
	br := bufio.NewReaderSize(r, 64<<10)
	bw := bufio.NewWriter(w)
	for {
		line, err := br.ReadSlice('\n')
		ended := err == nil
		if errors.Is(err, bufio.ErrBufferFull) {
			err = nil // a long line: the rest follows
		}
		if ended {
			line = line[:len(line)-1]
			if n := len(line); n > 0 && line[n-1] == '\r' {
				line = line[:n-1]
			}
		}
		writeEscaped(bw, line)
		if ended {
			bw.WriteByte('\n')
		}
		if err == io.EOF {
			return bw.Flush()
		}
		if err != nil {
			return err
		}
	}
}

func writeEscaped(w *bufio.Writer, b []byte) {
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(w, `\x%02x`, b[0])
		case r != '\t' && !strconv.IsPrint(r):
			q := strconv.QuoteRuneToASCII(r)
			w.WriteString(q[1 : len(q)-1])
		default:
			w.Write(b[:size])
		}
		b = b[size:]
	}
}
