// Package localsvc runs private, throwaway PostgreSQL and Redis servers as
// child processes of the current Go process.
//
// It exists for `tallyd dev`, for tests that need to kill and restart a
// database or cache (which must never be done to the shared servers on
// 127.0.0.1:5432 and :6379), and for the crash/torture tests.
//
// The servers are started directly (postgres -D, redis-server) rather than
// through pg_ctl, because pg_ctl daemonizes postgres: the server would then
// not be our child, so we could neither wait for it nor have the kernel kill
// it when we die. On Linux every child gets its own process group and a
// parent-death signal, so a crashed or killed test binary does not leak
// servers.
//
// PostgreSQL refuses to run as root. When the current process runs as root,
// initdb and postgres are run as the unprivileged "postgres" OS user, and the
// directories they need are handed to that user.
//
// StartTopology runs the production database topology on one machine:
// three etcd members, two PostgreSQL nodes under Patroni, HAProxy routing
// to the node Patroni calls the primary, and PgBouncer in front of it (see
// Topology). StartPgBouncer runs a PgBouncer on its own. Patroni, unlike
// this package, detaches the postmasters it starts, so a topology also
// runs a small guardian process that takes them down if the test binary
// dies.
package localsvc
