// Package queue is smarthost's durable outbound queue: a bbolt file that
// holds every accepted message until each of its recipients is delivered or
// has failed, and the Scheduler that claims due messages and hands them to a
// delivery function with bounded concurrency and exponential backoff.
//
// Delivery is at-least-once: an attempt is recorded (fsynced) before any
// network I/O, so a crash during delivery leads to a retry, never a loss.
// The outcome of an attempt and the DSNs it calls for are recorded in one
// transaction, so a bounce is neither lost nor sent twice.
//
// Operators act on queued messages with Store.Delete, Hold, Release, Retry
// and Flush; a held message is never claimed.
package queue
