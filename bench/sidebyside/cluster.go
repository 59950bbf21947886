package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"smarthost/internal/testpg"
)

// startSmarthostCluster runs replicas smarthost processes on one queue in
// a PostgreSQL server of their own, durable as in production (fsync on).
// The client shares its sessions out among the replicas' listeners
// (Addrs), as a Service that balances connections in the kernel would,
// with no proxy of its own on the machine's cores.
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
	inst.Addr, inst.Addrs = addrs[0], addrs
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
