package queue

import (
	"time"

	bolt "go.etcd.io/bbolt"
)

// DamageRecord makes the record of message id in the queue file at path,
// which no Store holds open, unreadable: for the conformance suite, run
// from package queue_test.
func DamageRecord(path, id string) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(msgsBucket).Put([]byte(id), []byte{recordVersion, '{'})
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	return err
}

// StopRenewing stops the renewal of s's leases, as if its process hung:
// they lapse while s still holds its attempts.
func (s *PGStore) StopRenewing() { s.stopRenewal() }
