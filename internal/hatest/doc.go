// Package hatest holds Tally's high-availability tests: Redis Sentinel
// failover under a balance workload, PostgreSQL failover to a synchronous
// (and an asynchronous) standby, point-in-time recovery, and a rolling
// upgrade from the previous release. Each starts its own private servers
// (internal/localsvc) on free ports; the shared PostgreSQL and Redis are
// only used the way every other package's tests use them.
package hatest
