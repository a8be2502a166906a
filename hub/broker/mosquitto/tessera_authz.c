/*
 * tessera_authz: Tessera's authorization, enforced inside Mosquitto 2.0 (plugin API v5).
 *
 * Who may connect, and what each connected principal may publish, subscribe to and receive, comes from the hub's
 * SQLite registry (hub/authz/schema.py: the authz_credentials view, role_rules, authz_events). The decisions are
 * the ones hub/authz/policy.py makes in Python; a change to either must be made to both.
 *
 * mosquitto.conf
 *   per_listener_settings false        2.0.11 delivers MOSQ_EVT_TICK only with global security settings
 *   allow_anonymous false
 *   plugin <path of the built .so>
 *   plugin_opt_registry <path>         registry.sqlite3 (required), opened read-only
 *   plugin_opt_device_ca <path>        PEM certificate of the device CA (required)
 *   plugin_opt_service_ca <path>       PEM certificate of the service CA (required)
 *   plugin_opt_max_payload <bytes>     largest PUBLISH payload (default 262144)
 *   plugin_opt_connect_rate <n>        connects per principal per minute (default 30)
 *   plugin_opt_connect_burst <n>       token bucket size (default 10)
 *   listeners: TLS with require_certificate true, and neither use_identity_as_username nor
 *   use_subject_as_username (both skip MOSQ_EVT_BASIC_AUTH; such clients would be refused everything).
 * Options are read once: a SIGHUP reload keeps the running values. A missing or invalid option, an unreadable CA
 * file or a registry that cannot be opened makes the plugin's init fail, and Mosquitto refuses to start.
 *
 * Connect (MOSQ_EVT_BASIC_AUTH): the client certificate's issuer (device or service CA) and serial select one
 * authz_credentials row; the principal and the certificate must be active (or the certificate superseded and
 * still in its grace time, see credential_refusal), within validity, the certificate's CN and the MQTT client id
 * must both be the principal, and the principal's connect token bucket must have a token. The session's username
 * becomes the principal. Anything else, including any registry error, refuses the connection.
 *
 * Rights: each principal's role rules, with {id} and {group} filled in, are kept in memory; ACL checks never
 * touch the registry. The registry's authz_events table says whose rights changed: it is read every 100 ms (and
 * at once when the hub rings on $CONTROL/tessera/v1), and every live session of a principal named there is
 * re-checked, its rules reloaded or the client kicked. Every 5 s sessions past their certificate's not_after (or
 * a superseded certificate's grace) are kicked.
 *
 * Messages (MOSQ_EVT_MESSAGE): every accepted PUBLISH has its properties replaced by the user properties
 * tessera-sender = principal and tessera-role = role, so devices can trust who sent a command.
 *
 * Control: a client of kind 'hub' publishes "sync <request-id> [<after-seq>]" (id: 1-64 of A-Z a-z 0-9 -) to
 * $CONTROL/tessera/v1; the plugin processes new authz events and answers on $CONTROL/tessera/v1/response, to that
 * client only, with "<request-id> ok seq=<last event seq> kicked=<n>" (n: sessions cut by this pass, or with
 * <after-seq>, by every recent pass that applied events newer than it, the tick's included) or
 * "<request-id> error <message>" ("-" for an unreadable id).
 *
 * Log lines (all start with "tessera_authz: "):
 *   refused principal=<p|-> serial=<hex|-> client_id=<id>: <reason>
 *   kicked principal=<p> serial=<hex>: <reason>
 *   ignored control message from client_id=<id>: <why>
 *   registry error (<what>): <SQLite message>
 *   registry unreadable: <why>           decisions are refusals until it is readable again
 *   registry <path> was deleted or replaced  /  registry <path> reopened (events from seq <n>)
 *   registry readable again (events from seq <n>)
 * Reasons: no client certificate, unknown issuer, unknown certificate, revoked, suspended, superseded, expired,
 * not yet valid, certificate CN mismatch, client id mismatch, rate limited, registry unreadable, out of memory.
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -o tessera_authz.so tessera_authz.c -lsqlite3 -lcrypto
 * (hub/broker/mosquitto/build.py). Not linked with libmosquitto: the broker exports the functions used here.
 * Everything runs on Mosquitto's single main thread, so there is no locking.
 */

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sqlite3.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <mqtt_protocol.h>

/* uthash/utlist with the broker's allocator, so our memory shows up in the broker's accounting. */
#undef uthash_malloc
#undef uthash_free
#define uthash_malloc(sz) mosquitto_malloc(sz)
#define uthash_free(ptr, sz) mosquitto_free(ptr)
#include <uthash.h>

#define UNUSED(x) (void)(x)

#define CONTROL_TOPIC "$CONTROL/tessera/v1"
#define CONTROL_RESPONSE CONTROL_TOPIC "/response"
#define SENDER_PROPERTY "tessera-sender"
#define ROLE_PROPERTY "tessera-role"

#define POLL_INTERVAL 0.1       /* seconds between reads of authz_events */
#define POLL_BACKOFF 1.0        /* ... while the registry is unreadable */
#define SWEEP_INTERVAL 5.0      /* seconds between expiry sweeps */
#define BUSY_TIMEOUT_MS 1000    /* a decision waits at most this long for a locked registry */

#define TS_LEN 40               /* "2026-12-02T00:33:54.123456+00:00" is 32 */
#define SERIAL_LEN 64           /* RFC 5280 serials have at most 20 octets: 40 hex digits */
#define NAME_LEN 128

/* Exactly hub/authz/schema.py's CREDENTIAL_QUERY and RULES_QUERY (a test compares them). */
static const char CREDENTIAL_SQL[] = "SELECT principal, kind, role, cert_status, principal_status, not_before, not_after, grace_until, groups FROM authz_credentials WHERE issuer = ?1 AND serial = ?2";
static const char RULES_SQL[] = "SELECT action, pattern FROM role_rules WHERE role = ?1";
/* A principal's groups, from the JSON array in authz_credentials.groups. */
static const char GROUPS_SQL[] = "SELECT value FROM json_each(?1) WHERE type = 'text'";
/* The role of an active principal, for contexts that are not a live connection (see rights_of). */
static const char PRINCIPAL_SQL[] = "SELECT kind, role, groups FROM authz_credentials "
                                    "WHERE principal = ?1 AND principal_status = 'active' LIMIT 1";
static const char EVENTS_SQL[] = "SELECT seq, principal FROM authz_events WHERE seq > ?1 ORDER BY seq";
static const char MAX_SEQ_SQL[] = "SELECT COALESCE(MAX(seq), 0) FROM authz_events";

enum action { ACT_PUBLISH, ACT_RETAIN, ACT_SUBSCRIBE, ACT_RECEIVE, ACT_COUNT };
static const char *const ACTION_NAMES[ACT_COUNT] = {"publish", "retain", "subscribe", "receive"};

/* A growable list of owned strings: topic patterns, groups, client ids to kick. */
struct strlist {
	char **v;
	size_t n, cap;
};

/*
 * Everything known about one principal (device id, svc.<name> or tessera-hub). Rights depend on the principal only
 * (its role and groups), not on which of its certificates a session uses, so they live here and every session of
 * the principal shares them. Principals are kept until the plugin is unloaded: there is at most one per registry
 * principal that connected, or whose retained messages or will were checked.
 */
struct principal {
	char *name;                         /* hash key */
	char kind[16];                      /* device, service or hub */
	char *role;
	bool loaded;                        /* kind, role and grants are current */
	bool allowed;                       /* loaded and the principal is active */
	struct strlist grants[ACT_COUNT];  /* expanded role rules, by action */
	char active_serial[SERIAL_LEN];     /* certificate it last connected with while active ("" none) */
	double tokens, refilled;            /* connect token bucket, refilled at monotonic time `refilled` */
	bool dirty;                         /* named by an authz event: re-check its sessions */
	bool checking;                      /* being re-checked (dirty when the pass started) */
	int sessions;                       /* live sessions (at most one: client id = principal; two in a takeover) */
	bool presence;                      /* it published its status: announce offline when its last session ends */
	UT_hash_handle hh;
};

/* One admitted client connection, from MOSQ_EVT_BASIC_AUTH until MOSQ_EVT_DISCONNECT. */
struct session {
	struct mosquitto *client;           /* hash key */
	struct principal *principal;
	char issuer[8];                     /* device or service */
	char serial[SERIAL_LEN];
	char not_after[TS_LEN];
	char grace_until[TS_LEN];           /* "" unless the certificate is superseded */
	UT_hash_handle hh;
};

/* One authz_credentials row. */
struct credential {
	char principal[NAME_LEN], kind[16], role[NAME_LEN], cert_status[16], principal_status[16];
	char not_before[TS_LEN], not_after[TS_LEN], grace_until[TS_LEN];
	char *groups;                       /* JSON array (mosquitto_strdup'd) */
};

static struct {
	mosquitto_plugin_id_t *id;
	char *registry;
	X509 *device_ca, *service_ca;
	uint32_t max_payload;
	double connect_rate;                /* tokens per minute */
	double connect_burst;
	sqlite3 *db;
	sqlite3_stmt *credential, *rules, *groups, *principal, *events;
	sqlite3_int64 seq;                  /* highest authz_events.seq processed */
	bool unreadable;                    /* the last registry access failed (logged once) */
	bool reloading;                     /* between MOSQ_EVT_RELOAD and the next tick */
	double next_poll, next_sweep;
	struct principal *principals;
	struct session *sessions;
} g;


/* ---- small helpers ------------------------------------------------------------------------------------------ */

static double monotonic(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Now in the registry's timestamp format (UTC, microseconds): text order is time order. */
static void now_ts(char out[TS_LEN])
{
	struct timespec ts;
	struct tm tm;
	size_t n;

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(out, TS_LEN, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out + n, TS_LEN - n, ".%06ld+00:00", ts.tv_nsec / 1000);
}

/* A client-supplied string made safe for one log line. */
static const char *printable(char *buf, size_t len, const char *s)
{
	size_t i = 0;

	if(s == NULL) return "-";
	for(; *s && i + 1 < len; s++){
		buf[i++] = (*s >= 0x20 && *s < 0x7f) ? *s : '?';
	}
	buf[i] = '\0';
	return buf;
}

static bool copy_column(sqlite3_stmt *stmt, int col, char *buf, size_t len)
{
	const unsigned char *text = sqlite3_column_text(stmt, col);
	size_t n = text ? strlen((const char *)text) : 0;

	if(n >= len) return false;
	memcpy(buf, text ? (const char *)text : "", n + 1);
	return true;
}

static void db_error(const char *what)
{
	mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: registry error (%s): %s", what,
			g.db ? sqlite3_errmsg(g.db) : "not open");
}

static void strlist_clear(struct strlist *ps)
{
	for(size_t i = 0; i < ps->n; i++) mosquitto_free(ps->v[i]);
	mosquitto_free(ps->v);
	memset(ps, 0, sizeof(*ps));
}

/* Takes ownership of `s` (also on failure). */
static int strlist_add(struct strlist *ps, char *s)
{
	if(s == NULL) return -1;
	if(ps->n == ps->cap){
		size_t cap = ps->cap ? 2 * ps->cap : 8;
		char **v = mosquitto_realloc(ps->v, cap * sizeof(char *));
		if(v == NULL){
			mosquitto_free(s);
			return -1;
		}
		ps->v = v;
		ps->cap = cap;
	}
	ps->v[ps->n++] = s;
	return 0;
}

/*
 * Kick every client id on the list (without its will) and empty the list. Kicks are collected while iterating over
 * the sessions and run afterwards, because a kick runs on_disconnect at once.
 */
static void kick_all(struct strlist *kicks)
{
	for(size_t i = 0; i < kicks->n; i++) mosquitto_kick_client_by_clientid(kicks->v[i], false);
	strlist_clear(kicks);
}


/* ---- topic rules: the same decisions as hub/authz/policy.py ------------------------------------------------- */

/* Write `pattern` with {id} and {group} filled in to `out` (NULL: only count); the length without the NUL. */
static size_t expand_into(char *out, const char *pattern, const char *id, const char *group)
{
	size_t n = 0;
	const char *s = pattern, *fill;
	size_t skip;

	while(*s){
		if(!strncmp(s, "{id}", 4)){
			fill = id;
			skip = 4;
		}else if(group && !strncmp(s, "{group}", 7)){
			fill = group;
			skip = 7;
		}else{
			if(out) out[n] = *s;
			n++;
			s++;
			continue;
		}
		if(out) memcpy(out + n, fill, strlen(fill));
		n += strlen(fill);
		s += skip;
	}
	if(out) out[n] = '\0';
	return n;
}

/* policy.expand for one rule and one group (group NULL: the rule has no {group}). */
static char *expand(const char *pattern, const char *id, const char *group)
{
	char *out = mosquitto_malloc(expand_into(NULL, pattern, id, group) + 1);

	if(out) expand_into(out, pattern, id, group);
	return out;
}

/* policy.topic_matches against any pattern (mosquitto_topic_matches_sub has the same `$` and `#` rules). */
static bool topic_allowed(const struct strlist *ps, const char *topic)
{
	bool match;

	for(size_t i = 0; i < ps->n; i++){
		match = false;
		if(mosquitto_topic_matches_sub(ps->v[i], topic, &match) == MOSQ_ERR_SUCCESS && match) return true;
	}
	return false;
}

/*
 * policy.filter_covered: every topic the subscription filter `flt` can match is matched by `pattern`. A `+` or `#`
 * in the filter is only covered by a `+` or `#` in the pattern at that level (or a `#` before it).
 */
static bool filter_covered(const char *pattern, const char *flt)
{
	const char *p = pattern, *f = flt;
	bool f_done = false;

	/* MQTT 4.7.2: a filter starting with a wildcard never matches a topic starting with '$' */
	if(flt[0] == '$' && (pattern[0] == '+' || pattern[0] == '#')) return false;

	for(;;){
		size_t pl = strcspn(p, "/"), fl;

		if(pl == 1 && p[0] == '#') return true;
		if(f_done) return false;                        /* the pattern has more levels than the filter */
		fl = strcspn(f, "/");
		if(fl == 1 && f[0] == '#') return false;
		if(!(pl == 1 && p[0] == '+')){
			if((fl == 1 && f[0] == '+') || fl != pl || memcmp(p, f, pl)) return false;
		}
		if(p[pl] != '/') return f[fl] != '/';           /* last pattern level: the filter must end too */
		p += pl + 1;
		if(f[fl] == '/') f += fl + 1; else f_done = true;
	}
}

static bool subscribe_allowed(const struct strlist *ps, const char *flt)
{
	for(size_t i = 0; i < ps->n; i++){
		if(filter_covered(ps->v[i], flt)) return true;
	}
	return false;
}

/* policy.strip_share: the filter inside $share/<name>/<filter>, the filter itself otherwise; NULL if malformed. */
static const char *strip_share(const char *flt)
{
	const char *name, *slash;

	if(strncmp(flt, "$share/", 7)) return flt;
	name = flt + 7;
	slash = strchr(name, '/');
	if(slash == NULL || slash == name || slash[1] == '\0') return NULL;
	if(memchr(name, '+', (size_t)(slash - name)) || memchr(name, '#', (size_t)(slash - name))) return NULL;
	return slash + 1;
}


/* ---- the registry ------------------------------------------------------------------------------------------- */

static void registry_close(void)
{
	sqlite3_finalize(g.credential);
	sqlite3_finalize(g.rules);
	sqlite3_finalize(g.groups);
	sqlite3_finalize(g.principal);
	sqlite3_finalize(g.events);
	g.credential = g.rules = g.groups = g.principal = g.events = NULL;
	sqlite3_close(g.db);
	g.db = NULL;
}

/* Open the registry read-only, prepare every statement once and read the newest event seq into *seq. */
static int registry_open(sqlite3_int64 *seq)
{
	struct { sqlite3_stmt **stmt; const char *sql; } prepared[] = {
		{&g.credential, CREDENTIAL_SQL}, {&g.rules, RULES_SQL}, {&g.groups, GROUPS_SQL},
		{&g.principal, PRINCIPAL_SQL}, {&g.events, EVENTS_SQL},
	};
	sqlite3_stmt *max_seq = NULL;
	int rc;

	rc = sqlite3_open_v2(g.registry, &g.db, SQLITE_OPEN_READONLY, NULL);
	if(rc != SQLITE_OK) goto error;
	sqlite3_busy_timeout(g.db, BUSY_TIMEOUT_MS);
	for(size_t i = 0; i < sizeof(prepared) / sizeof(prepared[0]); i++){
		rc = sqlite3_prepare_v3(g.db, prepared[i].sql, -1, SQLITE_PREPARE_PERSISTENT, prepared[i].stmt, NULL);
		if(rc != SQLITE_OK) goto error;
	}
	rc = sqlite3_prepare_v2(g.db, MAX_SEQ_SQL, -1, &max_seq, NULL);
	if(rc != SQLITE_OK || (rc = sqlite3_step(max_seq)) != SQLITE_ROW) goto error;
	*seq = sqlite3_column_int64(max_seq, 0);
	sqlite3_finalize(max_seq);
	return 0;

error:
	if(!g.unreadable){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: registry unreadable: cannot open %s: %s", g.registry,
				g.db ? sqlite3_errmsg(g.db) : sqlite3_errstr(rc));
	}
	sqlite3_finalize(max_seq);
	registry_close();
	return -1;
}

/*
 * True if the registry can be read. A registry file that was deleted or replaced since it was opened would go on
 * being read from the old inode, so that is checked first: the file now at the path is opened instead (or, if
 * there is none, every decision fails closed until there is). After a reopen every session is re-checked, since
 * the new file's events cannot be related to the old one's.
 */
static bool registry_ready(void)
{
	int moved = 0;
	sqlite3_int64 seq;
	struct principal *p, *ptmp;

	if(g.db){
		if(sqlite3_file_control(g.db, "main", SQLITE_FCNTL_HAS_MOVED, &moved) != SQLITE_OK || !moved) return true;
		mosquitto_log_printf(MOSQ_LOG_WARNING, "tessera_authz: registry %s was deleted or replaced", g.registry);
		registry_close();
	}
	if(registry_open(&seq)){
		g.unreadable = true;
		return false;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "tessera_authz: registry %s reopened (events from seq %lld)", g.registry,
			(long long)seq);
	g.unreadable = false;
	g.seq = seq;
	HASH_ITER(hh, g.principals, p, ptmp) p->dirty = true;
	return true;
}

static void credential_free(struct credential *c)
{
	mosquitto_free(c->groups);
	c->groups = NULL;
}

/* CREDENTIAL_QUERY for (issuer, serial): 1 and *c filled, 0 if there is no such row, -1 on a registry error. */
static int credential_lookup(const char *issuer, const char *serial, struct credential *c)
{
	sqlite3_stmt *q;
	int rc, found = -1;

	memset(c, 0, sizeof(*c));
	if(!registry_ready()) return -1;
	q = g.credential;   /* only now: registry_ready() may have reopened the registry and re-prepared it */
	sqlite3_bind_text(q, 1, issuer, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(q, 2, serial, -1, SQLITE_TRANSIENT);
	rc = sqlite3_step(q);
	if(rc == SQLITE_ROW){
		const unsigned char *groups = sqlite3_column_text(q, 8);
		if(copy_column(q, 0, c->principal, sizeof(c->principal)) && copy_column(q, 1, c->kind, sizeof(c->kind))
				&& copy_column(q, 2, c->role, sizeof(c->role))
				&& copy_column(q, 3, c->cert_status, sizeof(c->cert_status))
				&& copy_column(q, 4, c->principal_status, sizeof(c->principal_status))
				&& copy_column(q, 5, c->not_before, sizeof(c->not_before))
				&& copy_column(q, 6, c->not_after, sizeof(c->not_after))
				&& copy_column(q, 7, c->grace_until, sizeof(c->grace_until))
				&& (c->groups = mosquitto_strdup(groups ? (const char *)groups : "[]")) != NULL){
			found = 1;
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: registry error (credential lookup): "
					"oversized value for serial %s", serial);
		}
	}else if(rc == SQLITE_DONE){
		found = 0;
	}else{
		db_error("credential lookup");
	}
	sqlite3_reset(q);
	sqlite3_clear_bindings(q);
	if(found != 1) credential_free(c);
	return found;
}

/*
 * Why the certificate `serial` with row `c` may not be used at `now`, or NULL if it may.
 * A superseded certificate keeps working until its grace_until, but only while the principal has not connected
 * with a newer certificate since the broker started: p->active_serial is the last certificate the principal
 * connected with while that one was active (a session that was on this very certificate before it was
 * superseded is still in its grace).
 */
static const char *credential_refusal(const struct credential *c, const char *serial, const struct principal *p,
		const char *now)
{
	if(strcmp(c->principal_status, "active")){
		return strcmp(c->principal_status, "suspended") ? "revoked" : "suspended";
	}
	if(!strcmp(c->cert_status, "superseded")){
		if(strcmp(c->grace_until, now) <= 0) return "superseded";  /* "" (no grace) sorts first */
		if(p && p->active_serial[0] && strcmp(p->active_serial, serial)) return "superseded";
	}else if(strcmp(c->cert_status, "active")){
		return "revoked";
	}
	if(strcmp(c->not_before, now) > 0) return "not yet valid";
	if(strcmp(c->not_after, now) <= 0) return "expired";
	return NULL;
}


/* ---- principals and their rights ---------------------------------------------------------------------------- */

static struct principal *principal_find(const char *name)
{
	struct principal *p = NULL;

	HASH_FIND_STR(g.principals, name, p);
	return p;
}

static struct principal *principal_get(const char *name)
{
	struct principal *p = principal_find(name);

	if(p) return p;
	p = mosquitto_calloc(1, sizeof(*p));
	if(p == NULL || (p->name = mosquitto_strdup(name)) == NULL){
		mosquitto_free(p);
		return NULL;
	}
	p->tokens = g.connect_burst;
	p->refilled = monotonic();
	HASH_ADD_KEYPTR(hh, g.principals, p->name, strlen(p->name), p);
	return p;
}

static void principal_forget_rights(struct principal *p)
{
	for(int a = 0; a < ACT_COUNT; a++) strlist_clear(&p->grants[a]);
	mosquitto_free(p->role);
	p->role = NULL;
	p->loaded = p->allowed = false;
}

/* Take a connect token from the principal's bucket (refilled at connect_rate per minute up to connect_burst). */
static bool principal_take_token(struct principal *p)
{
	double t = monotonic();

	p->tokens += (t - p->refilled) * g.connect_rate / 60.0;
	if(p->tokens > g.connect_burst) p->tokens = g.connect_burst;
	p->refilled = t;
	if(p->tokens < 1.0) return false;
	p->tokens -= 1.0;
	return true;
}

/*
 * Load an active principal's rights: RULES_QUERY for its role, {id} = its name, {group} = each group in the JSON
 * array (a rule with {group} gives nothing when there are none). On a registry error the old rights are kept and
 * -1 returned: the caller then refuses.
 */
static int principal_load(struct principal *p, const char *kind, const char *role, const char *groups_json)
{
	struct strlist groups = {0}, fresh[ACT_COUNT];
	char *role_copy = NULL;
	int rc, result = -1;

	memset(fresh, 0, sizeof(fresh));
	sqlite3_bind_text(g.groups, 1, groups_json, -1, SQLITE_TRANSIENT);
	while((rc = sqlite3_step(g.groups)) == SQLITE_ROW){
		if(strlist_add(&groups, mosquitto_strdup((const char *)sqlite3_column_text(g.groups, 0)))) goto out;
	}
	if(rc != SQLITE_DONE){
		db_error("groups");
		goto out;
	}
	sqlite3_bind_text(g.rules, 1, role, -1, SQLITE_TRANSIENT);
	while((rc = sqlite3_step(g.rules)) == SQLITE_ROW){
		const char *action = (const char *)sqlite3_column_text(g.rules, 0);
		const char *pattern = (const char *)sqlite3_column_text(g.rules, 1);
		int a;

		for(a = 0; a < ACT_COUNT && action && strcmp(action, ACTION_NAMES[a]); a++);
		if(a == ACT_COUNT || pattern == NULL) continue;  /* the table's CHECK allows no other action */
		if(strstr(pattern, "{group}")){
			for(size_t i = 0; i < groups.n; i++){
				if(strlist_add(&fresh[a], expand(pattern, p->name, groups.v[i]))) goto out;
			}
		}else if(strlist_add(&fresh[a], expand(pattern, p->name, NULL))){
			goto out;
		}
	}
	if(rc != SQLITE_DONE){
		db_error("role rules");
		goto out;
	}
	if((role_copy = mosquitto_strdup(role)) == NULL) goto out;

	principal_forget_rights(p);
	memcpy(p->grants, fresh, sizeof(fresh));
	memset(fresh, 0, sizeof(fresh));
	snprintf(p->kind, sizeof(p->kind), "%s", kind);
	p->role = role_copy;
	p->loaded = p->allowed = true;
	result = 0;

out:
	sqlite3_reset(g.groups);
	sqlite3_clear_bindings(g.groups);
	sqlite3_reset(g.rules);
	sqlite3_clear_bindings(g.rules);
	strlist_clear(&groups);
	for(int a = 0; a < ACT_COUNT; a++) strlist_clear(&fresh[a]);
	return result;
}

/* The principal's rights from PRINCIPAL_SQL, cached until an authz event names it; NULL if not active or on error. */
static struct principal *principal_current(const char *name)
{
	struct principal *p = principal_get(name);
	char kind[16], role[NAME_LEN];
	int rc;

	if(p == NULL || p->loaded) return (p && p->allowed) ? p : NULL;
	if(!registry_ready()) return NULL;
	sqlite3_bind_text(g.principal, 1, name, -1, SQLITE_TRANSIENT);
	rc = sqlite3_step(g.principal);
	if(rc == SQLITE_ROW && copy_column(g.principal, 0, kind, sizeof(kind))
			&& copy_column(g.principal, 1, role, sizeof(role))){
		const unsigned char *groups = sqlite3_column_text(g.principal, 2);
		char *groups_copy = mosquitto_strdup(groups ? (const char *)groups : "[]");

		sqlite3_reset(g.principal);  /* principal_load runs other statements */
		if(groups_copy) principal_load(p, kind, role, groups_copy);
		mosquitto_free(groups_copy);
	}else if(rc == SQLITE_DONE){
		principal_forget_rights(p);
		p->loaded = true;            /* known: not an active principal */
	}else{
		db_error("principal lookup");
	}
	sqlite3_reset(g.principal);
	sqlite3_clear_bindings(g.principal);
	return p->allowed ? p : NULL;
}


/* ---- sessions ----------------------------------------------------------------------------------------------- */

static struct session *session_find(const struct mosquitto *client)
{
	struct session *s = NULL;

	HASH_FIND_PTR(g.sessions, &client, s);
	return s;
}

/*
 * Presence is the broker's word, not the client's: when the last session of a device that published its status
 * ends (disconnect, network loss or kick) the plugin publishes the retained {"state": "offline"} on
 * devices/<id>/status itself, stamped like any message. Wills are refused (see on_acl_check): Mosquitto 2.0.11 sends them without MOSQ_EVT_MESSAGE, so their
 * client-supplied properties could never be replaced.
 */
static void announce_offline(const struct principal *p)
{
	static const char payload[] = "{\"state\": \"offline\"}";
	mosquitto_property *props = NULL;
	char topic[NAME_LEN + 32];

	if(strcmp(p->kind, "device") || p->role == NULL) return;
	snprintf(topic, sizeof(topic), "devices/%s/status", p->name);
	if(mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, SENDER_PROPERTY, p->name)
			|| mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, ROLE_PROPERTY, p->role)){
		mosquitto_property_free_all(&props);
		return;
	}
	/* the broker takes ownership of props */
	mosquitto_broker_publish_copy(NULL, topic, (int)strlen(payload), payload, 1, true, props);
}

static void session_drop_quietly(struct session *s)
{
	s->principal->sessions--;
	HASH_DEL(g.sessions, s);
	mosquitto_free(s);
}

static void session_drop(struct session *s)
{
	struct principal *p = s->principal;

	session_drop_quietly(s);
	if(p->sessions == 0 && p->presence){
		p->presence = false;
		announce_offline(p);
	}
}

static void session_set_validity(struct session *s, const struct credential *c)
{
	snprintf(s->not_after, sizeof(s->not_after), "%s", c->not_after);
	snprintf(s->grace_until, sizeof(s->grace_until), "%s",
			strcmp(c->cert_status, "superseded") ? "" : c->grace_until);
}

/* Log, forget the session now and queue its client for a kick (client id = principal, checked at connect). */
static void session_doom(struct session *s, const char *reason, struct strlist *kicks)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "tessera_authz: kicked principal=%s serial=%s: %s",
			s->principal->name, s->serial, reason);
	/* Out of memory: the client stays connected but, without a session, is refused everything. */
	strlist_add(kicks, mosquitto_strdup(s->principal->name));
	session_drop(s);
}

/*
 * The principal whose rights apply to `client`, or NULL: deny.
 *
 * A live client has a session. Mosquitto also checks contexts that are not live connections: the will of a
 * client that has just disconnected (after MOSQ_EVT_DISCONNECT), messages queued for a disconnected persistent
 * session, sessions restored from persistence, and the publisher of a retained message (check_retain_source: a
 * zeroed stand-in context with only the client id and username). None of those has a TLS session; for them the
 * username we set at connect names the principal and its current rights apply (an inactive principal has none).
 * A live TLS client without a session (one we never admitted) gets nothing.
 */
static struct principal *rights_of(struct mosquitto *client)
{
	struct session *s = session_find(client);
	const char *id = mosquitto_client_id(client), *username;
	X509 *cert;

	if(s){
		if(id == NULL || strcmp(id, s->principal->name)) return NULL;
		return s->principal->allowed ? s->principal : NULL;
	}
	cert = mosquitto_client_certificate(client);
	if(cert){
		X509_free(cert);
		return NULL;
	}
	username = mosquitto_client_username(client);
	return username ? principal_current(username) : NULL;
}


/* ---- following authz_events --------------------------------------------------------------------------------- */

/* Re-check every session of a dirty principal against the registry, reload their rights, kick the refused. */
static void recheck_dirty(struct strlist *kicks)
{
	struct principal *p, *ptmp;
	struct session *s, *stmp;
	struct credential c;
	char now[TS_LEN];
	const char *reason;
	bool any = false;
	int rc;

	/* A registry reopen during the pass marks everything dirty again: that is for the next pass. */
	HASH_ITER(hh, g.principals, p, ptmp){
		p->checking = p->dirty;
		p->dirty = false;
		if(p->checking){
			p->loaded = false;   /* the first session still admitted reloads the rights */
			any = true;
		}
	}
	if(!any) return;
	now_ts(now);
	HASH_ITER(hh, g.sessions, s, stmp){
		p = s->principal;
		if(!p->checking) continue;
		rc = credential_lookup(s->issuer, s->serial, &c);
		reason = rc < 0 ? "registry unreadable" : rc == 0 ? "unknown certificate"
				: credential_refusal(&c, s->serial, p, now);
		if(reason == NULL && !p->loaded && principal_load(p, c.kind, c.role, c.groups)) reason = "registry unreadable";
		if(reason) session_doom(s, reason, kicks); else session_set_validity(s, &c);
		credential_free(&c);
	}
	HASH_ITER(hh, g.principals, p, ptmp){
		if(p->checking && !p->loaded) principal_forget_rights(p);  /* no session left: reload when needed */
		p->checking = false;
	}
}

/*
 * How many sessions the processing of recent events cut off, by the newest event seq of each pass. The tick may
 * apply a commit's events before the hub's doorbell does; `sync <id> <after>` then still reports the kicks of
 * every pass that applied events newer than <after>.
 */
#define KICK_LOG 256
static struct { sqlite3_int64 seq; int kicked; } kick_log[KICK_LOG];
static size_t kick_log_next;

static int kicked_after(sqlite3_int64 after)
{
	int n = 0;

	for(size_t i = 0; i < KICK_LOG; i++){
		if(kick_log[i].seq > after) n += kick_log[i].kicked;
	}
	return n;
}

/*
 * Read the authz events after g.seq, mark the principals they name (NULL: all) dirty, re-check those.
 * Returns -1 if the events could not be read. Kicks are added to `kicks`.
 */
static int poll_events(struct strlist *kicks, bool wait_for_lock)
{
	struct principal *p, *ptmp;
	sqlite3_int64 seq_before = g.seq;
	size_t kicks_before = kicks->n;
	int rc;

	if(!registry_ready()) return -1;
	/* The tick does not wait for a locked registry (it stalls the whole broker); it tries again next time. */
	if(!wait_for_lock) sqlite3_busy_timeout(g.db, 0);
	sqlite3_bind_int64(g.events, 1, g.seq);
	while((rc = sqlite3_step(g.events)) == SQLITE_ROW){
		const char *name = (const char *)sqlite3_column_text(g.events, 1);

		g.seq = sqlite3_column_int64(g.events, 0);
		if(name == NULL){
			HASH_ITER(hh, g.principals, p, ptmp) p->dirty = true;
		}else if((p = principal_find(name)) != NULL){
			p->dirty = true;
		}
	}
	if(rc != SQLITE_DONE && !g.unreadable){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: registry unreadable: authz events: %s; sessions are "
				"not re-checked until it is readable", sqlite3_errmsg(g.db));
	}
	sqlite3_reset(g.events);
	sqlite3_clear_bindings(g.events);
	sqlite3_busy_timeout(g.db, BUSY_TIMEOUT_MS);
	if(rc == SQLITE_DONE && g.unreadable){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "tessera_authz: registry readable again (events from seq %lld)",
				(long long)g.seq);
	}
	g.unreadable = (rc != SQLITE_DONE);
	recheck_dirty(kicks);   /* whatever was read before an error still counts */
	if(g.seq > seq_before){
		kick_log[kick_log_next].seq = g.seq;
		kick_log[kick_log_next].kicked = (int)(kicks->n - kicks_before);
		kick_log_next = (kick_log_next + 1) % KICK_LOG;
	}
	return g.unreadable ? -1 : 0;
}

/* Kick sessions whose certificate has expired or whose superseded certificate's grace is over. */
static void sweep(struct strlist *kicks)
{
	struct session *s, *stmp;
	char now[TS_LEN];

	now_ts(now);
	HASH_ITER(hh, g.sessions, s, stmp){
		if(strcmp(s->not_after, now) <= 0){
			session_doom(s, "expired", kicks);
		}else if(s->grace_until[0] && strcmp(s->grace_until, now) <= 0){
			session_doom(s, "superseded", kicks);
		}
	}
}


/* ---- event callbacks ---------------------------------------------------------------------------------------- */

/* Lowercase hex of a non-negative serial without leading zeros (Python's format(serial, "x")). */
static bool serial_hex(X509 *cert, char out[SERIAL_LEN])
{
	BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
	char *hex = NULL;
	const char *h;
	bool ok = false;

	if(bn && !BN_is_negative(bn) && (hex = BN_bn2hex(bn)) != NULL){
		for(h = hex; h[0] == '0' && h[1]; h++);
		if(strlen(h) < SERIAL_LEN){
			size_t i;
			for(i = 0; h[i]; i++) out[i] = (h[i] >= 'A' && h[i] <= 'F') ? (char)(h[i] - 'A' + 'a') : h[i];
			out[i] = '\0';
			ok = true;
		}
	}
	OPENSSL_free(hex);
	BN_free(bn);
	return ok;
}

/* The subject's only CN as UTF-8 into out; "" if there is none, several, or it does not fit. */
static void subject_cn(X509 *cert, char *out, size_t len)
{
	X509_NAME *subject = X509_get_subject_name(cert);
	int idx = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
	unsigned char *utf8 = NULL;
	int n;

	out[0] = '\0';
	if(idx < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, idx) >= 0) return;
	n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, idx)));
	if(n > 0 && (size_t)n < len && memchr(utf8, '\0', (size_t)n) == NULL){
		memcpy(out, utf8, (size_t)n);
		out[n] = '\0';
	}
	OPENSSL_free(utf8);
}

/*
 * Every refusal returns MOSQ_ERR_AUTH: Mosquitto 2.0.11 then answers CONNACK 0x87 Not authorized (MQTT 3.1.1:
 * return code 5). A plugin cannot choose another code from MOSQ_EVT_BASIC_AUTH (0x9F "connection rate exceeded"
 * for a rate limit, 0x86, ...): the broker maps every non-success result to that one answer.
 */
static int refuse(struct mosquitto *client, const char *principal, const char *serial, const char *reason)
{
	struct session *s = session_find(client);
	char id[72];

	if(s) session_drop(s);  /* a reload re-check that failed */
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "tessera_authz: refused principal=%s serial=%s client_id=%s: %s",
			principal ? principal : "-", serial && serial[0] ? serial : "-",
			printable(id, sizeof(id), mosquitto_client_id(client)), reason);
	return MOSQ_ERR_AUTH;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ev = event_data;
	struct mosquitto *client = ev->client;
	struct session *s = session_find(client);
	struct principal *p;
	struct credential c;
	const char *issuer = NULL, *id, *reason = NULL;
	char serial[SERIAL_LEN] = "", cn[NAME_LEN], now[TS_LEN];
	bool recheck = g.reloading && s != NULL;  /* SIGHUP: Mosquitto re-authenticates every client */
	X509 *cert;
	int rc;

	UNUSED(event);
	UNUSED(userdata);
	cert = mosquitto_client_certificate(client);
	if(cert == NULL){
		/*
		 * On a reload Mosquitto 2.0.11 also re-authenticates disconnected persistent sessions, which have no TLS
		 * session. Refusing one would disconnect it a second time (and insert it twice into the broker's session
		 * expiry list); it has no rights of its own here (see rights_of), so let it be.
		 */
		if(g.reloading && s == NULL) return MOSQ_ERR_SUCCESS;
		return refuse(client, NULL, NULL, "no client certificate");
	}
	if(!X509_NAME_cmp(X509_get_issuer_name(cert), X509_get_subject_name(g.device_ca))) issuer = "device";
	else if(!X509_NAME_cmp(X509_get_issuer_name(cert), X509_get_subject_name(g.service_ca))) issuer = "service";
	if(!serial_hex(cert, serial)) serial[0] = '\0';
	subject_cn(cert, cn, sizeof(cn));
	X509_free(cert);
	if(issuer == NULL) return refuse(client, NULL, serial, "unknown issuer");
	if(serial[0] == '\0') return refuse(client, NULL, NULL, "unknown certificate");

	rc = credential_lookup(issuer, serial, &c);
	if(rc < 0) return refuse(client, NULL, serial, "registry unreadable");
	if(rc == 0) return refuse(client, NULL, serial, "unknown certificate");

	now_ts(now);
	id = mosquitto_client_id(client);
	reason = credential_refusal(&c, serial, principal_find(c.principal), now);
	if(!reason && strcmp(cn, c.principal)) reason = "certificate CN mismatch";
	if(!reason && (id == NULL || strcmp(id, c.principal))) reason = "client id mismatch";
	if(!reason && (p = principal_get(c.principal)) == NULL) reason = "out of memory";
	if(!reason && !recheck && !principal_take_token(p)) reason = "rate limited";
	if(!reason && principal_load(p, c.kind, c.role, c.groups)) reason = "registry unreadable";
	if(!reason && mosquitto_set_username(client, p->name) != MOSQ_ERR_SUCCESS) reason = "out of memory";
	if(!reason && s == NULL){
		if((s = mosquitto_calloc(1, sizeof(*s))) == NULL){
			reason = "out of memory";
		}else{
			s->client = client;
			s->principal = p;
			p->sessions++;
			HASH_ADD_PTR(g.sessions, client, s);
		}
	}
	if(reason){
		rc = refuse(client, c.principal, serial, reason);
		credential_free(&c);
		return rc;
	}
	s->principal = p;
	snprintf(s->issuer, sizeof(s->issuer), "%s", issuer);
	snprintf(s->serial, sizeof(s->serial), "%s", serial);
	session_set_validity(s, &c);
	/*
	 * From now on the principal's superseded certificates are refused. Another live session of the principal
	 * (necessarily on the same client id) is disconnected by Mosquitto itself right after this callback (session
	 * takeover), so there is nothing to kick here; a kick by client id would hit this new session.
	 */
	if(!strcmp(c.cert_status, "active")) snprintf(p->active_serial, sizeof(p->active_serial), "%s", serial);
	credential_free(&c);
	return MOSQ_ERR_SUCCESS;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ev = event_data;
	struct principal *p;
	const char *flt;

	UNUSED(event);
	UNUSED(userdata);
	if(ev->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if((p = rights_of(ev->client)) == NULL) return MOSQ_ERR_ACL_DENIED;
	switch(ev->access){
		case MOSQ_ACL_WRITE:
			if(ev->payloadlen > g.max_payload) return MOSQ_ERR_ACL_DENIED;
			/*
			 * A WRITE from a context without a session is either a will (the real, disconnecting client: it has
			 * an address) or check_retain_source (a zeroed stand-in for the publisher of a retained message that
			 * is about to be delivered: no address). Wills are refused: 2.0.11 sends them without
			 * MOSQ_EVT_MESSAGE, so their client-supplied properties (a forged tessera-role) cannot be replaced;
			 * the plugin announces a device's offline status itself (announce_offline).
			 */
			if(session_find(ev->client) == NULL && (!ev->retain || mosquitto_client_address(ev->client) != NULL)){
				return MOSQ_ERR_ACL_DENIED;
			}
			if(!topic_allowed(&p->grants[ACT_PUBLISH], ev->topic)) return MOSQ_ERR_ACL_DENIED;
			if(ev->retain && !topic_allowed(&p->grants[ACT_RETAIN], ev->topic)) return MOSQ_ERR_ACL_DENIED;
			return MOSQ_ERR_SUCCESS;
		case MOSQ_ACL_READ:
			return topic_allowed(&p->grants[ACT_RECEIVE], ev->topic) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_SUBSCRIBE:
			flt = strip_share(ev->topic);
			return flt && subscribe_allowed(&p->grants[ACT_SUBSCRIBE], flt) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
}

/* Replace whatever properties the publisher sent with who it is: devices trust these to accept commands. */
static int on_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ev = event_data;
	struct session *s = session_find(ev->client);

	UNUSED(event);
	UNUSED(userdata);
	if(s == NULL || !s->principal->allowed) return MOSQ_ERR_ACL_DENIED;
	if(!strcmp(s->principal->kind, "device") && !strncmp(ev->topic, "devices/", 8)
			&& !strncmp(ev->topic + 8, s->principal->name, strlen(s->principal->name))
			&& !strcmp(ev->topic + 8 + strlen(s->principal->name), "/status")){
		s->principal->presence = true;
	}
	mosquitto_property_free_all(&ev->properties);
	if(mosquitto_property_add_string_pair(&ev->properties, MQTT_PROP_USER_PROPERTY, SENDER_PROPERTY,
				s->principal->name)
			|| mosquitto_property_add_string_pair(&ev->properties, MQTT_PROP_USER_PROPERTY, ROLE_PROPERTY,
				s->principal->role)){
		mosquitto_property_free_all(&ev->properties);
		return MOSQ_ERR_NOMEM;
	}
	return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ev = event_data;
	struct session *s = session_find(ev->client);

	UNUSED(event);
	UNUSED(userdata);
	if(s) session_drop(s);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	UNUSED(event);
	UNUSED(event_data);
	UNUSED(userdata);
	g.reloading = true;   /* Mosquitto now re-authenticates every client; the next tick ends this */
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct strlist kicks = {0};
	double t = monotonic();

	UNUSED(event);
	UNUSED(event_data);
	UNUSED(userdata);
	g.reloading = false;
	if(t >= g.next_poll){   /* the tick comes after every pass of the main loop: at least every 100 ms */
		g.next_poll = t + (poll_events(&kicks, false) ? POLL_BACKOFF : POLL_INTERVAL);
	}
	if(t >= g.next_sweep){
		g.next_sweep = t + SWEEP_INTERVAL;
		sweep(&kicks);
	}
	kick_all(&kicks);
	return MOSQ_ERR_SUCCESS;
}

/* "sync <request-id>" (one line) from the hub: process new authz events now and say what happened. */
static int on_control(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *ev = event_data;
	struct session *s = session_find(ev->client);
	struct strlist kicks = {0};
	char request[96], client_id[NAME_LEN], response[160], shown[72];
	const char *rid = "-";
	long long after = -1;
	size_t len = ev->payloadlen, n;
	int rc;

	UNUSED(event);
	UNUSED(userdata);
	if(s == NULL || strcmp(s->issuer, "service") || strcmp(s->principal->kind, "hub")){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "tessera_authz: ignored control message from client_id=%s: "
				"only the hub identity may use " CONTROL_TOPIC,
				printable(shown, sizeof(shown), mosquitto_client_id(ev->client)));
		return MOSQ_ERR_SUCCESS;   /* an error here would make Mosquitto drop the connection */
	}
	snprintf(client_id, sizeof(client_id), "%s", s->principal->name);  /* s may be kicked below */
	if(len > 0 && ((const char *)ev->payload)[len - 1] == '\n') len--;
	if(len > 0 && ((const char *)ev->payload)[len - 1] == '\r') len--;
	/* "sync <request-id>" or "sync <request-id> <after-seq>" */
	if(len > 5 && len - 5 < sizeof(request) && !memcmp(ev->payload, "sync ", 5)){
		memcpy(request, (const char *)ev->payload + 5, len - 5);
		request[len - 5] = '\0';
		n = strspn(request, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-");
		if(n >= 1 && n <= 64 && request[n] == '\0'){
			rid = request;
		}else if(n >= 1 && n <= 64 && request[n] == ' ' && request[n + 1] && strlen(request + n + 1) <= 18
				&& strspn(request + n + 1, "0123456789") == strlen(request + n + 1)){
			request[n] = '\0';
			after = strtoll(request + n + 1, NULL, 10);
			rid = request;
		}
	}
	if(rid == request){
		rc = poll_events(&kicks, true);
		rc = rc ? snprintf(response, sizeof(response), "%s error registry unreadable", rid)
			: snprintf(response, sizeof(response), "%s ok seq=%lld kicked=%d", rid, (long long)g.seq,
				after >= 0 ? kicked_after(after) : (int)kicks.n);
		kick_all(&kicks);
	}else{
		rc = snprintf(response, sizeof(response), "- error malformed request: expected 'sync <request-id> [<seq>]'");
	}
	mosquitto_broker_publish_copy(client_id, CONTROL_RESPONSE, rc, response, 1, false, NULL);
	return MOSQ_ERR_SUCCESS;
}


/* ---- plugin entry points ------------------------------------------------------------------------------------ */

static const struct { int event; MOSQ_FUNC_generic_callback cb; const char *data; } CALLBACKS[] = {
	{MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL}, {MOSQ_EVT_ACL_CHECK, on_acl_check, NULL},
	{MOSQ_EVT_MESSAGE, on_message, NULL}, {MOSQ_EVT_DISCONNECT, on_disconnect, NULL},
	{MOSQ_EVT_RELOAD, on_reload, NULL}, {MOSQ_EVT_TICK, on_tick, NULL},
	{MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC},
};
#define CALLBACK_COUNT (sizeof(CALLBACKS) / sizeof(CALLBACKS[0]))

static void free_everything(void)
{
	struct principal *p, *ptmp;
	struct session *s, *stmp;

	HASH_ITER(hh, g.sessions, s, stmp) session_drop_quietly(s);
	HASH_ITER(hh, g.principals, p, ptmp){
		HASH_DEL(g.principals, p);
		principal_forget_rights(p);
		mosquitto_free(p->name);
		mosquitto_free(p);
	}
	registry_close();
	X509_free(g.device_ca);
	X509_free(g.service_ca);
	mosquitto_free(g.registry);
	memset(&g, 0, sizeof(g));
}

static X509 *load_ca(const char *option, const char *path)
{
	FILE *f;
	X509 *cert = NULL;

	if(path == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: plugin_opt_%s is required", option);
		return NULL;
	}
	if((f = fopen(path, "r")) == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: cannot read %s %s: %s", option, path, strerror(errno));
		return NULL;
	}
	cert = PEM_read_X509(f, NULL, NULL, NULL);
	fclose(f);
	if(cert == NULL) mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: %s %s holds no PEM certificate", option, path);
	return cert;
}

static bool parse_number(const char *option, const char *value, double min, double max, bool integer, double *out)
{
	char *end;
	double v;

	if(value == NULL) return true;  /* keep the default */
	errno = 0;
	v = strtod(value, &end);
	if(errno || end == value || *end || !(v >= min && v <= max) || (integer && v != (double)(long long)v)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: invalid plugin_opt_%s '%s' (%s from %g to %g)",
				option, value, integer ? "a whole number" : "a number", min, max);
		return false;
	}
	*out = v;
	return true;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data, struct mosquitto_opt *opts,
		int opt_count)
{
	const char *registry = NULL, *device_ca = NULL, *service_ca = NULL;
	const char *max_payload = NULL, *connect_rate = NULL, *connect_burst = NULL;
	double payload = 262144;
	size_t registered = 0;

	UNUSED(user_data);
	memset(&g, 0, sizeof(g));
	g.id = identifier;
	g.connect_rate = 30;
	g.connect_burst = 10;
	for(int i = 0; i < opt_count; i++){
		const char *k = opts[i].key, *v = opts[i].value;
		if(!strcmp(k, "registry")) registry = v;
		else if(!strcmp(k, "device_ca")) device_ca = v;
		else if(!strcmp(k, "service_ca")) service_ca = v;
		else if(!strcmp(k, "max_payload")) max_payload = v;
		else if(!strcmp(k, "connect_rate")) connect_rate = v;
		else if(!strcmp(k, "connect_burst")) connect_burst = v;
		else mosquitto_log_printf(MOSQ_LOG_WARNING, "tessera_authz: unknown option plugin_opt_%s ignored", k);
	}
	if(!parse_number("max_payload", max_payload, 0, 268435455, true, &payload)
			|| !parse_number("connect_rate", connect_rate, 0.001, 1e6, false, &g.connect_rate)
			|| !parse_number("connect_burst", connect_burst, 1, 1e6, true, &g.connect_burst)){
		goto error;
	}
	g.max_payload = (uint32_t)payload;
	if(registry == NULL || registry[0] == '\0'){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: plugin_opt_registry is required");
		goto error;
	}
	if((g.device_ca = load_ca("device_ca", device_ca)) == NULL) goto error;
	if((g.service_ca = load_ca("service_ca", service_ca)) == NULL) goto error;
	if(!X509_NAME_cmp(X509_get_subject_name(g.device_ca), X509_get_subject_name(g.service_ca))){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: the device and service CAs have the same subject");
		goto error;
	}
	if((g.registry = mosquitto_strdup(registry)) == NULL || registry_open(&g.seq)) goto error;

	for(registered = 0; registered < CALLBACK_COUNT; registered++){
		if(mosquitto_callback_register(identifier, CALLBACKS[registered].event, CALLBACKS[registered].cb,
					CALLBACKS[registered].data, NULL) != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera_authz: cannot register callback for event %d",
					CALLBACKS[registered].event);
			goto error;
		}
	}
	g.next_poll = g.next_sweep = monotonic();
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "tessera_authz: enforcing registry %s (events from seq %lld)",
			g.registry, (long long)g.seq);
	return MOSQ_ERR_SUCCESS;

error:
	while(registered-- > 0){
		mosquitto_callback_unregister(identifier, CALLBACKS[registered].event, CALLBACKS[registered].cb,
				CALLBACKS[registered].data);
	}
	free_everything();
	return MOSQ_ERR_INVAL;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	UNUSED(user_data);
	UNUSED(opts);
	UNUSED(opt_count);
	if(g.id){
		for(size_t i = 0; i < CALLBACK_COUNT; i++){
			mosquitto_callback_unregister(g.id, CALLBACKS[i].event, CALLBACKS[i].cb, CALLBACKS[i].data);
		}
	}
	free_everything();
	return MOSQ_ERR_SUCCESS;
}
