// Package zds is the node agent's side of ZDS, the protocol that hands
// enrolled pods and their network namespaces to ztunnel. It owns the
// socket, the framing, the snapshot and who holds what; it does not decide
// which pods are enrolled and never touches iptables. Package zdstest is a
// small client for tests.
//
// # The contract ztunnel implements
//
// Transport: a unix SOCK_SEQPACKET socket at /var/run/ztunnel/ztunnel.sock
// (mode 0600, root). The agent listens; ztunnel connects, and reconnects
// whenever the connection ends (the agent restarted, or closed it). Every
// datagram is one protobuf message of package istio.workload.zds
// (proto/zds); messages from ztunnel must fit in 4096 bytes, and an empty
// datagram reads as end of stream, so never send one.
//
//  1. ztunnel sends ZdsHello{version: V1} within 5 s of connecting. Any
//     other version, garbage or silence closes the connection.
//  2. The agent replays its snapshot: for every enrolled pod on the node,
//     in uid order, a WorkloadRequest{add: AddWorkload{uid, workload_info
//     {name, namespace, service_account}}} with exactly one file descriptor
//     attached as SCM_RIGHTS: the pod's network namespace. ztunnel must
//     take the descriptor (close it when it drops the pod). A pod the agent
//     can no longer open comes as WorkloadRequest{keep: KeepWorkload{uid}}
//     without a descriptor: keep what you have for it.
//  3. WorkloadRequest{snapshot_sent: {}} ends the replay. ztunnel then drops
//     every pod it holds that the snapshot did not name.
//  4. Afterwards, AddWorkload (with the descriptor) arrives when a pod is
//     enrolled, and again for a uid it already has when the pod got a new
//     netns (a re-created sandbox): replace the old one. DelWorkload{uid}
//     (proto field 2) arrives when a pod leaves the mesh or goes away.
//     AddWorkload goes to the newest connection only, DelWorkload to all.
//  5. ztunnel answers every request, including SnapshotSent, with exactly
//     one WorkloadResponse{ack: Ack{error}}: error empty once it really
//     holds the pod (listeners on 15001, 15006, 15008 and 15053 are open in
//     its netns, sockets marked 0x539), else a reason. It sends nothing
//     else and nothing unasked. The agent waits 5 s for each Ack; a late,
//     extra or malformed message closes the connection (ztunnel reconnects
//     and gets a fresh snapshot).
//
// A pod is held once a live connection acked its latest AddWorkload (or
// Keep). Until then it is pending: its traffic is already redirected, so it
// goes nowhere, and the CNI plugin keeps the pod from starting. A refused
// Add (Ack with an error) leaves the pod pending; the agent retries it on
// the next AddWorkload (the runtime retries the pod's sandbox) or on
// reconnection.
package zds
