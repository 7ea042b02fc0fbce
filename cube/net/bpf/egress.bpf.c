// SPDX-License-Identifier: GPL-2.0
/*
 * Cube sandbox egress classifier: runs on the ingress hook of a sandbox's tap, which is the
 * guest's egress. One copy of this program (and of its maps) is loaded per sandbox, so no map is
 * ever shared between sandboxes.
 *
 * Order of decisions (the Python side, cube/net/policy.py, documents why):
 *   1. not configured yet                        -> drop   (a pooled tap filters everything)
 *   2. VLAN tag (in-band or already stripped)    -> drop
 *   3. source MAC is not the sandbox's           -> drop
 *   4. ARP: sender must be the sandbox's MAC/IP  -> pass, else drop; other ethertypes -> drop
 *   5. source IP is not the sandbox's            -> drop   (IPv6 neighbour discovery excepted)
 *   6. to the sandbox's gateway: UDP/TCP port 53 -> pass if DNS is on; anything else -> drop
 *   7. always-deny tries (host, sandboxes, private, link-local, loopback, multicast, metadata)
 *                                                -> drop
 *   8. internet access off                       -> drop
 *   9. allow trie                                -> pass   (E2B: allowOut wins over denyOut)
 *  10. deny trie                                 -> drop
 *  11. otherwise                                 -> pass   (E2B's default)
 * Every header is read with bpf_skb_load_bytes, so a frame whose headers sit in paged data
 * (a guest can arrange that with a virtio-net header) is parsed like any other; anything that
 * cannot be read is dropped.
 *
 * Reason numbers, counter slots, flags and sizes come from cube_layout.h, generated from
 * cube/net/layout.py at build time so that Python and C cannot disagree.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "cube_layout.h"

char LICENSE[] SEC("license") = "GPL";

struct config {
	__u8 guest_mac[6];
	__u8 enabled;
	__u8 flags;
	__u8 guest4[4];
	__u8 gateway4[4];
	__u8 guest6[16];
	__u8 gateway6[16];
};

struct key4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct key6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct counters {
	__u64 slot[CUBE_N_COUNTERS];
};

struct event {
	__u64 ts_ns;
	__u8 reason;
	__u8 family;
	__u8 proto;
	__u8 _pad;
	__u16 dport;
	__u16 _pad2;
	__u8 daddr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} cube_cfg SEC(".maps");

#define LPM(name, key_t, size)                                 \
	struct {                                               \
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);           \
		__uint(map_flags, BPF_F_NO_PREALLOC);          \
		__uint(max_entries, size);                     \
		__type(key, key_t);                            \
		__type(value, __u8);                           \
	} name SEC(".maps")

LPM(cube_allow4, struct key4, CUBE_ALLOW_ENTRIES);
LPM(cube_deny4, struct key4, CUBE_DENY_ENTRIES);
LPM(cube_block4, struct key4, CUBE_BLOCK_ENTRIES);
LPM(cube_allow6, struct key6, CUBE_ALLOW_ENTRIES);
LPM(cube_deny6, struct key6, CUBE_DENY_ENTRIES);
LPM(cube_block6, struct key6, CUBE_BLOCK_ENTRIES);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} cube_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CUBE_LOG_BYTES);
} cube_events SEC(".maps");

struct pkt {
	__u8 family;
	__u8 proto;
	__u16 dport;
	__u8 daddr[16];
};

/* Count the decision and log a drop. A global (not inlined) function: the verifier checks it
 * once instead of at each of the ~20 call sites, which halves load time (2.5 ms, not 5). `reason`
 * is 64-bit so that the bounds check and the array index use the same register. */
__attribute__((noinline)) int verdict(struct __sk_buff *skb, __u64 reason, struct pkt *p)
{
	__u32 zero = 0;
	struct counters *c;
	int pass;

	if (!skb || !p || reason >= CUBE_N_REASONS)
		return TC_ACT_SHOT;
	pass = reason < CUBE_FIRST_DROP;
	c = bpf_map_lookup_elem(&cube_stats, &zero);
	if (c) {
		c->slot[reason]++;
		c->slot[pass ? CUBE_SLOT_BYTES_PASSED : CUBE_SLOT_BYTES_DROPPED] += skb->len;
	}
	if (pass)
		return TC_ACT_OK;
	struct event *e = bpf_ringbuf_reserve(&cube_events, sizeof(*e), 0);
	if (!e) {
		if (c)
			c->slot[CUBE_SLOT_LOG_LOST]++;
		return TC_ACT_SHOT;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->reason = reason;
	e->family = p->family;
	e->proto = p->proto;
	e->dport = p->dport;
	__builtin_memcpy(e->daddr, p->daddr, sizeof(e->daddr));
	bpf_ringbuf_submit(e, 0);
	return TC_ACT_SHOT;
}

/* Byte-wise compare: no alignment assumptions, and no memcmp (BPF has no libc to call). */
static __always_inline int same(const __u8 *a, const __u8 *b, const int n)
{
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < n; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

#define eq4(a, b) same(a, b, 4)
#define eq6(a, b) same(a, b, 16)

/* Destination port of a UDP or TCP header at `off`, or 0 when there is none to read. */
static __always_inline __u16 dest_port(struct __sk_buff *skb, __u32 off, __u8 proto)
{
	__be16 port;

	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
		return 0;
	if (bpf_skb_load_bytes(skb, off + 2, &port, sizeof(port)))
		return 0;
	return bpf_ntohs(port);
}

/* Steps 6 to 11 for one address family: the same order for both, different maps. */
#define DECIDE(skb, c, p, gateway, eqf, key, block, allow, deny)                           \
	do {                                                                               \
		if (eqf((p)->daddr, (c)->gateway)) {                                       \
			if ((p)->dport != 53)                                              \
				return verdict(skb, CUBE_DROP_ALWAYS, p);                  \
			if ((c)->flags & CUBE_FLAG_DNS)                                    \
				return verdict(skb, CUBE_PASS_DNS, p);                     \
			return verdict(skb, CUBE_DROP_NO_INTERNET, p);                     \
		}                                                                          \
		if (bpf_map_lookup_elem(&block, &key))                                     \
			return verdict(skb, CUBE_DROP_ALWAYS, p);                          \
		if (!((c)->flags & CUBE_FLAG_INTERNET))                                    \
			return verdict(skb, CUBE_DROP_NO_INTERNET, p);                     \
		if (bpf_map_lookup_elem(&allow, &key))                                     \
			return verdict(skb, CUBE_PASS_ALLOW, p);                           \
		if (bpf_map_lookup_elem(&deny, &key))                                      \
			return verdict(skb, CUBE_DROP_DENY, p);                            \
		return verdict(skb, CUBE_PASS_DEFAULT, p);                                 \
	} while (0)

static __always_inline int ipv4(struct __sk_buff *skb, struct config *c, struct pkt *p)
{
	struct iphdr ip;
	struct key4 key = {.prefixlen = 32};

	p->family = 4;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5)
		return verdict(skb, CUBE_DROP_MALFORMED, p);
	__builtin_memcpy(p->daddr, &ip.daddr, 4);
	p->proto = ip.protocol;
	if (!eq4((__u8 *)&ip.saddr, c->guest4))
		return verdict(skb, CUBE_DROP_SPOOF, p);
	/* Only a first, unfragmented datagram has a port to read; every fragment still carries
	 * the destination, so fragments are judged by address alone (and never count as DNS). */
	if (!(ip.frag_off & bpf_htons(0x3fff) /* MF | fragment offset */))
		p->dport = dest_port(skb, ETH_HLEN + ip.ihl * 4, ip.protocol);
	__builtin_memcpy(key.addr, &ip.daddr, 4);
	DECIDE(skb, c, p, gateway4, eq4, key, cube_block4, cube_allow4, cube_deny4);
}

static __always_inline int link_local(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

static __always_inline int unspecified(const __u8 *a)
{
	const __u8 zero[16] = {};

	return eq6(a, zero);
}

/* Neighbour discovery: router/neighbour solicitations and advertisements with hop limit 255,
 * sent to a link-scoped destination (ff02::/16, fe80::/10) or to the gateway. Such packets are
 * never forwarded, so they may carry a link-local or (for DAD) unspecified source (RFC 4861);
 * any other source must still be the sandbox's own. */
static __always_inline int is_nd(struct __sk_buff *skb, struct config *c, struct ipv6hdr *ip)
{
	__u8 type;
	__u8 *d = ip->daddr.s6_addr, *s = ip->saddr.s6_addr;

	if (ip->nexthdr != IPPROTO_ICMPV6 || ip->hop_limit != 255)
		return 0;
	if (!(d[0] == 0xff && d[1] == 0x02) && !link_local(d) && !eq6(d, c->gateway6))
		return 0;
	if (!link_local(s) && !unspecified(s) && !eq6(s, c->guest6))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*ip), &type, 1))
		return 0;
	return type == 133 || type == 135 || type == 136;
}

static __always_inline int ipv6(struct __sk_buff *skb, struct config *c, struct pkt *p)
{
	struct ipv6hdr ip;
	struct key6 key = {.prefixlen = 128};

	p->family = 6;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 6)
		return verdict(skb, CUBE_DROP_MALFORMED, p);
	__builtin_memcpy(p->daddr, &ip.daddr, 16);
	p->proto = ip.nexthdr;
	if (is_nd(skb, c, &ip))
		return verdict(skb, CUBE_PASS_ND, p);
	if (!eq6((__u8 *)&ip.saddr, c->guest6))
		return verdict(skb, CUBE_DROP_SPOOF, p);
	/* Extension headers (hop-by-hop, routing, fragment, ...) can hide the transport header
	 * or redirect the packet; the guest needs none of them, so they fail closed. */
	if (ip.nexthdr != IPPROTO_TCP && ip.nexthdr != IPPROTO_UDP && ip.nexthdr != IPPROTO_ICMPV6)
		return verdict(skb, CUBE_DROP_IPV6_EXT, p);
	p->dport = dest_port(skb, ETH_HLEN + sizeof(ip), ip.nexthdr);
	__builtin_memcpy(key.addr, &ip.daddr, 16);
	DECIDE(skb, c, p, gateway6, eq6, key, cube_block6, cube_allow6, cube_deny6);
}

/* ARP for IPv4 over Ethernet only, and only in the sandbox's own name. */
static __always_inline int arp(struct __sk_buff *skb, struct config *c, struct pkt *p)
{
	struct {
		__be16 htype, ptype;
		__u8 hlen, plen;
		__be16 op;
		__u8 sha[6], spa[4], tha[6], tpa[4];
	} __attribute__((packed)) a;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &a, sizeof(a)) || a.htype != bpf_htons(1) ||
	    a.ptype != bpf_htons(ETH_P_IP) || a.hlen != 6 || a.plen != 4)
		return verdict(skb, CUBE_DROP_MALFORMED, p);
	if (!same(a.sha, c->guest_mac, 6) || !eq4(a.spa, c->guest4))
		return verdict(skb, CUBE_DROP_SPOOF, p);
	return verdict(skb, CUBE_PASS_ARP, p);
}

SEC("tc")
int cube_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct pkt p = {};
	struct ethhdr eth;
	struct config *c = bpf_map_lookup_elem(&cube_cfg, &zero);

	if (!c || !c->enabled)
		return verdict(skb, CUBE_DROP_DISABLED, &p);
	/* The stack strips an 802.1Q tag into skb metadata before this hook runs, so a tagged
	 * frame shows up as plain IPv4: check the metadata as well as the ethertype. */
	if (skb->vlan_present || bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return verdict(skb, CUBE_DROP_ETHERTYPE, &p);
	if (!same(eth.h_source, c->guest_mac, 6))
		return verdict(skb, CUBE_DROP_SPOOF, &p);
	switch (eth.h_proto) {
	case bpf_htons(ETH_P_IP):
		return ipv4(skb, c, &p);
	case bpf_htons(ETH_P_IPV6):
		return ipv6(skb, c, &p);
	case bpf_htons(ETH_P_ARP):
		return arp(skb, c, &p);
	}
	return verdict(skb, CUBE_DROP_ETHERTYPE, &p);
}
