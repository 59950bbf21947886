// Package queue is smarthost's durable outbound queue. Backend is the
// storage that holds every accepted message until each of its recipients
// is delivered or has failed; Store is its implementation in one bbolt
// file, and package queuetest the conformance suite that every Backend
// passes. The Scheduler claims due messages from a Backend and hands them
// to a delivery function with bounded concurrency and exponential backoff.
//
// Delivery is at-least-once: an attempt is recorded (fsynced) before any
// network I/O, so a crash during delivery leads to a retry, never a loss.
// The outcome of an attempt and the DSNs it calls for are recorded in one
// transaction, so a bounce is neither lost nor sent twice.
//
// Operators act on queued messages with a Backend's Delete, Hold, Release,
// Retry and Flush; a held message is never claimed.
package queue
