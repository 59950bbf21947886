package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"smarthost/internal/testpg"
)

// startSmarthostCluster runs replicas smarthost processes on one queue in
// a PostgreSQL server of their own, durable as in production (fsync on).
// With more than one replica, a round-robin TCP proxy in front gives each
// new session to the next replica, as a Kubernetes Service would; the
// proxy runs in this process, so its CPU is not counted as the relay's.
func (b *Bench) startSmarthostCluster(ctx context.Context, dir, upstream string, replicas int) (*relayInstance, error) {
	pg, dsn, err := b.startPostgres(ctx, filepath.Join(dir, "pg"))
	if err != nil {
		return nil, err
	}
	dsnFile := filepath.Join(dir, "queue-dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn+"\n"), 0o600); err != nil {
		b.sup.Stop(pg)
		return nil, err
	}
	queue := fmt.Sprintf("backend = \"postgres\"\ndsn_file = %q\n", dsnFile)
	inst := &relayInstance{problem: smarthostProblem}
	var addrs []string
	for i := range replicas {
		r, err := b.startSmarthostQueue(ctx, filepath.Join(dir, fmt.Sprintf("replica-%d", i)), upstream, false, queue)
		if err != nil {
			inst.Roots = append(inst.Roots, pg)
			inst.stop(b.sup)
			return nil, err
		}
		inst.Roots = append(inst.Roots, r.Roots...)
		inst.Logs = append(inst.Logs, r.Logs...)
		addrs = append(addrs, r.Addr)
		inst.HTTP = r.HTTP
	}
	// The database stops last, once no replica uses it.
	inst.Roots = append(inst.Roots, pg)
	inst.Addr = addrs[0]
	if replicas > 1 {
		rr, err := startRoundRobin(addrs)
		if err != nil {
			inst.stop(b.sup)
			return nil, err
		}
		inst.Addr, inst.front = rr.addr(), rr.close
	}
	return inst, nil
}

// startPostgres makes a cluster in dir with initdb and runs its server
// on a Unix socket there, as the user nobody (PostgreSQL refuses root),
// and returns the server and the connection string of its database.
func (b *Bench) startPostgres(ctx context.Context, dir string) (*Process, string, error) {
	postgres, err := testpg.Program("postgres")
	if err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, "", err
	}
	cred, err := testpg.Init(dir)
	if err != nil {
		return nil, "", err
	}
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	logFile, err := os.Create(filepath.Join(dir, "postgres.log"))
	if err != nil {
		return nil, "", err
	}
	defer logFile.Close()
	cmd := exec.Command(postgres, "-D", data, "-c", "listen_addresses=", "-c", "unix_socket_directories="+sock,
		"-c", "max_connections=100", "-c", "shared_buffers=128MB")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGTERM}
	p, err := b.sup.Start("postgres", cmd)
	if err != nil {
		return nil, "", err
	}
	dsn := fmt.Sprintf("host=%s user=postgres dbname=postgres sslmode=disable", sock)
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		conn, err := pgx.Connect(cctx, dsn)
		cancel()
		if err == nil {
			conn.Close(ctx)
			return p, dsn, nil
		}
		select {
		case <-p.Done():
			return nil, "", fmt.Errorf("postgres exited at start (%v): see %s", p.Err(), logFile.Name())
		case <-ctx.Done():
			b.sup.Stop(p)
			return nil, "", ctx.Err()
		case <-time.After(50 * time.Millisecond): // polling a server that is starting
		}
		if time.Now().After(deadline) {
			b.sup.Stop(p)
			return nil, "", fmt.Errorf("postgres: no connection within 30s: %v", err)
		}
	}
}

// roundRobin is a TCP proxy that gives each new connection to the next
// of its backends.
type roundRobin struct {
	ln       net.Listener
	backends []string
	next     atomic.Uint64
	wg       sync.WaitGroup
}

func startRoundRobin(backends []string) (*roundRobin, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rr := &roundRobin{ln: ln, backends: backends}
	rr.wg.Go(rr.serve)
	return rr, nil
}

func (rr *roundRobin) addr() string { return rr.ln.Addr().String() }

func (rr *roundRobin) close() {
	rr.ln.Close()
	rr.wg.Wait()
}

func (rr *roundRobin) serve() {
	for {
		c, err := rr.ln.Accept()
		if err != nil {
			return
		}
		backend := rr.backends[rr.next.Add(1)%uint64(len(rr.backends))]
		go pipe(c, backend) // ends with its connections, after close too
	}
}

// pipe copies both ways between c and a new connection to backend
// (io.Copy splices between TCP sockets on Linux) until either side
// closes.
func pipe(c net.Conn, backend string) {
	defer c.Close()
	d, err := net.Dial("tcp", backend)
	if err != nil {
		return
	}
	defer d.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(d, c); done <- struct{}{} }()
	go func() { io.Copy(c, d); done <- struct{}{} }()
	<-done
}
