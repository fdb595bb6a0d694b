//! In-memory world: tenants, users, mailboxes, tokens, subscriptions, faults and the request log.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Value, json};

use crate::SimConfig;
use crate::model::*;

pub(crate) const WELL_KNOWN: &[(&str, &str)] = &[
    ("inbox", "Inbox"),
    ("drafts", "Drafts"),
    ("sentitems", "Sent Items"),
    ("deleteditems", "Deleted Items"),
    ("junkemail", "Junk Email"),
    ("archive", "Archive"),
    ("outbox", "Outbox"),
];

#[derive(Clone, Debug)]
pub(crate) struct Folder {
    pub id: String,
    pub display_name: String,
    pub parent_id: String,
    pub well_known: Option<&'static str>,
    pub is_hidden: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Attachment {
    pub id: String,
    pub name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
    pub is_inline: bool,
    pub content_id: Option<String>,
    pub last_modified: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub(crate) struct Msg {
    pub id: String,
    pub immutable_id: String,
    pub folder_id: String,
    pub internet_message_id: String,
    pub conversation_id: String,
    pub conversation_index: Vec<u8>,
    pub subject: String,
    pub body_html: bool,
    pub body: String,
    pub from: Option<EmailAddress>,
    pub sender: Option<EmailAddress>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub reply_to: Vec<EmailAddress>,
    pub received: DateTime<Utc>,
    pub sent: Option<DateTime<Utc>>,
    pub created: DateTime<Utc>,
    pub last_modified: DateTime<Utc>,
    pub is_read: bool,
    pub is_draft: bool,
    pub change_key: String,
    /// Only mail that came from the internet has these (Graph omits them on drafts/sent items).
    pub headers: Vec<MessageHeader>,
    pub from_internet: bool,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub extra_headers: Vec<MessageHeader>,
    pub attachments: Vec<Attachment>,
    pub importance: String,
    /// Mailbox change clock value of the last change; drives delta "updated" entries.
    pub version: u64,
    pub field_versions: HashMap<&'static str, u64>,
}

impl Msg {
    pub fn out_id(&self, immutable: bool) -> &str {
        if immutable {
            &self.immutable_id
        } else {
            &self.id
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct SnapEntry {
    pub plain_id: String,
    pub version: u64,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DeltaOpts {
    pub select: Option<Vec<String>>,
    pub received_ge: Option<DateTime<Utc>>,
    pub order_desc: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct SyncState {
    pub snapshot: HashMap<String, SnapEntry>,
    pub opts: DeltaOpts,
}

#[derive(Clone, Debug)]
pub(crate) enum DeltaEntry {
    Created(String),
    Updated {
        immutable: String,
        since: u64,
    },
    Removed {
        plain_id: String,
        immutable: String,
        reason: &'static str,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Round {
    pub entries: Vec<DeltaEntry>,
    pub next_snapshot: HashMap<String, SnapEntry>,
    pub opts: DeltaOpts,
    pub page_size: usize,
    pub highest_page: usize,
    pub delta_token: Option<String>,
}

#[derive(Default, Debug)]
pub(crate) struct FolderDelta {
    pub generations: VecDeque<String>,
    pub states: HashMap<String, SyncState>,
    pub rounds: HashMap<String, Round>,
    pub round_order: VecDeque<String>,
}

#[derive(Default, Debug)]
pub(crate) struct Mailbox {
    pub folders: Vec<Folder>,
    pub msgs: BTreeMap<u64, Msg>,
    pub ids: HashMap<String, u64>,
    /// internetMessageId -> newest message carrying it; threading lookups on big mailboxes.
    pub imids: HashMap<String, u64>,
    pub next_seq: u64,
    pub clock: u64,
    pub delta: HashMap<String, FolderDelta>,
    pub delegates: HashSet<String>,
    /// Delegates (user ids) with full access but without SendAs: sending as this mailbox
    /// answers 403 `ErrorSendAsDenied`.
    pub send_as_denied: HashSet<String>,
    /// No cloud (Exchange Online) mailbox: mailbox routes answer 404
    /// `MailboxNotEnabledForRESTAPI`.
    pub no_cloud_mailbox: bool,
}

impl Mailbox {
    pub fn folder_id(&self, key: &str) -> Option<String> {
        let lower = key.to_ascii_lowercase();
        if lower == "msgfolderroot" {
            return self.folders.first().map(|f| f.id.clone());
        }
        self.folders
            .iter()
            .find(|f| f.id == key || f.well_known.is_some_and(|w| w == lower))
            .map(|f| f.id.clone())
    }
    pub fn folder(&self, id: &str) -> Option<&Folder> {
        self.folders.iter().find(|f| f.id == id)
    }
    pub fn well_known_id(&self, name: &str) -> String {
        self.folder_id(name).unwrap_or_default()
    }
    pub fn msg(&self, id: &str) -> Option<&Msg> {
        self.ids.get(id).and_then(|s| self.msgs.get(s))
    }
    pub fn msg_mut(&mut self, id: &str) -> Option<&mut Msg> {
        let seq = *self.ids.get(id)?;
        self.msgs.get_mut(&seq)
    }
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        self.ids.get(id).copied()
    }
    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
    pub fn insert(&mut self, msg: Msg) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.ids.insert(msg.id.clone(), seq);
        self.ids.insert(msg.immutable_id.clone(), seq);
        self.imids.insert(msg.internet_message_id.clone(), seq);
        self.msgs.insert(seq, msg);
        seq
    }
    pub fn remove(&mut self, seq: u64) -> Option<Msg> {
        let m = self.msgs.remove(&seq)?;
        self.ids.remove(&m.id);
        self.ids.remove(&m.immutable_id);
        if self.imids.get(&m.internet_message_id) == Some(&seq) {
            self.imids.remove(&m.internet_message_id);
        }
        Some(m)
    }
    pub fn in_folder<'a>(&'a self, folder_id: &'a str) -> impl Iterator<Item = &'a Msg> + 'a {
        self.msgs.values().filter(move |m| m.folder_id == folder_id)
    }
    pub fn by_internet_id(&self, imid: &str) -> Option<&Msg> {
        self.imids.get(imid).and_then(|s| self.msgs.get(s))
    }
}

pub(crate) struct UserRec {
    pub user: SimUser,
    pub mailbox: Mailbox,
    /// Refresh tokens with a sequence number at or below this are rejected with the code.
    pub revoked: Option<(u64, u32)>,
}

#[derive(Clone, Debug)]
pub(crate) struct AuthCode {
    pub user_id: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    pub challenge: Option<(String, String)>,
    pub expires: DateTime<Utc>,
    pub used: bool,
    pub nonce: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct AccessGrant {
    pub user_id: String,
    pub scopes: Vec<String>,
    pub expires: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub(crate) struct RefreshGrant {
    pub user_id: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub seq: u64,
    pub last_used: DateTime<Utc>,
    pub issued: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub(crate) struct Subscription {
    pub id: String,
    pub user_id: String,
    pub folder_id: Option<String>,
    pub resource: String,
    pub change_type: String,
    pub notification_url: String,
    pub lifecycle_url: Option<String>,
    pub client_state: Option<String>,
    pub expiration: DateTime<Utc>,
    pub immutable: bool,
    pub tenant_id: String,
}

#[derive(Clone, Debug)]
pub(crate) enum Outgoing {
    Change {
        sub_id: String,
        url: String,
        item: Value,
        change: String,
    },
    Lifecycle {
        sub_id: String,
        url: String,
        item: Value,
        event: String,
    },
}

pub(crate) struct PendingSent {
    pub due: DateTime<Utc>,
    pub user_id: String,
    pub msg: Msg,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Phase {
    Request,
    Token,
    Authorize,
    Send,
    SubscriptionCreate,
    Delta,
}

#[derive(Default)]
pub(crate) struct StatsAcc {
    pub total: u64,
    pub by_route: BTreeMap<String, BTreeMap<u16, u64>>,
    pub by_status: BTreeMap<u16, u64>,
    pub max_conc: BTreeMap<String, usize>,
    pub grants: BTreeMap<String, u64>,
    pub throttled: u64,
    pub notifications: u64,
    pub resets: u64,
}

pub(crate) struct State {
    pub cfg: SimConfig,
    pub rng: StdRng,
    pub clock_offset: Duration,
    pub tenants: Vec<SimTenant>,
    pub users: Vec<UserRec>,
    pub codes: HashMap<String, AuthCode>,
    pub access: HashMap<String, AccessGrant>,
    pub refresh: HashMap<String, RefreshGrant>,
    pub refresh_seq: u64,
    pub subs: BTreeMap<String, Subscription>,
    pub faults: Vec<(FaultId, FaultRule, u32)>,
    pub next_fault: u64,
    pub log: VecDeque<LogEntry>,
    pub log_seq: u64,
    pub stats: StatsAcc,
    pub inflight: HashMap<String, usize>,
    pub budget: HashMap<String, VecDeque<DateTime<Utc>>>,
    pub sends: Vec<SentRecord>,
    pub pending_sent: Vec<PendingSent>,
    pub outbox: Vec<Outgoing>,
    pub notifications: Vec<NotificationRecord>,
    pub login_user: Option<String>,
    /// The user who finishes every sign-in, whatever `login_hint` pre-filled.
    pub sign_in_as: Option<String>,
}

pub(crate) fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    let mut tag = String::new();
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                tag.clear();
            }
            '>' if in_tag => {
                in_tag = false;
                let t = tag.to_ascii_lowercase();
                if t.starts_with("br") || t.starts_with("/p") || t.starts_with("/div") {
                    out.push('\n');
                }
            }
            _ if in_tag => tag.push(c),
            _ => out.push(c),
        }
    }
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

pub(crate) fn text_to_html(text: &str) -> String {
    let esc = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<html><head>\r\n<meta http-equiv=\"Content-Type\" content=\"text/html; charset=utf-8\">\r\n</head>\r\n<body>\r\n<div>{}</div>\r\n</body>\r\n</html>\r\n",
        esc.replace('\n', "<br>\r\n")
    )
}

pub(crate) fn preview(msg: &Msg) -> String {
    let text = if msg.body_html {
        html_to_text(&msg.body)
    } else {
        msg.body.clone()
    };
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.chars().take(255).collect()
}

fn aad_error_text(code: u32, client_id: &str) -> (u16, &'static str, Option<&'static str>, String) {
    match code {
        70008 => (400, "invalid_grant", None, "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.".into()),
        700082 => (400, "invalid_grant", None, "The refresh token has expired due to inactivity. The token was issued on a date in the past and was inactive for 90.00:00:00.".into()),
        50173 => (400, "invalid_grant", None, "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.".into()),
        70043 => (400, "invalid_grant", None, "The refresh token has expired or is invalid due to sign-in frequency checks by conditional access.".into()),
        65001 => (400, "invalid_grant", Some("consent_required"), format!("The user or administrator has not consented to use the application with ID '{client_id}'. Send an interactive authorization request for this user and resource.")),
        50076 => (400, "interaction_required", None, "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000003-0000-0000-c000-000000000000'.".into()),
        50079 => (400, "interaction_required", None, "Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access '00000003-0000-0000-c000-000000000000'.".into()),
        53003 => (400, "interaction_required", None, "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.".into()),
        54005 => (400, "invalid_grant", None, "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.".into()),
        501481 => (400, "invalid_grant", None, "The Code_Verifier does not match the code_challenge supplied in the authorization request.".into()),
        9002313 => (400, "invalid_grant", None, "Invalid request. Request is malformed or invalid.".into()),
        50011 => (400, "invalid_grant", None, "The redirect URI specified in the request does not match the redirect URI used in the authorization request.".into()),
        70000 => (400, "invalid_grant", None, "Provided grant is invalid or malformed.".into()),
        7000215 => (401, "invalid_client", None, format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'.")),
        7000222 => (401, "invalid_client", None, format!("The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app.")),
        7000218 => (401, "invalid_client", None, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".into()),
        700016 => (400, "unauthorized_client", None, format!("Application with identifier '{client_id}' was not found in the directory.")),
        70003 => (400, "unsupported_grant_type", None, "The app requested an unsupported grant type.".into()),
        900144 => (400, "invalid_request", None, "The request body must contain the following parameter.".into()),
        90002 => (400, "invalid_request", None, "Tenant not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.".into()),
        90033 => (503, "temporarily_unavailable", None, "A transient error has occurred. Please try again.".into()),
        _ => (400, "invalid_grant", None, "The provided grant is invalid.".into()),
    }
}

/// Builds the identity-platform error body: `(status, body)`.
pub(crate) fn aad_error(
    code: u32,
    client_id: &str,
    detail: Option<&str>,
    now: DateTime<Utc>,
) -> (u16, Value) {
    let (status, error, suberror, text) = aad_error_text(code, client_id);
    let text = detail.map(str::to_string).unwrap_or(text);
    let trace = uuid::Uuid::new_v4().to_string();
    let corr = uuid::Uuid::new_v4().to_string();
    let ts = now.format("%Y-%m-%d %H:%M:%SZ").to_string();
    let mut body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {corr} Timestamp: {ts}"),
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    if let Some(s) = suberror {
        body["suberror"] = json!(s);
    }
    (status, body)
}

pub(crate) struct NewMsg {
    pub folder_id: String,
    pub subject: String,
    pub body_html: bool,
    pub body: String,
    pub from: Option<EmailAddress>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub reply_to: Vec<EmailAddress>,
    pub internet_message_id: Option<String>,
    pub conversation_id: Option<String>,
    pub conversation_index: Option<Vec<u8>>,
    pub received: Option<DateTime<Utc>>,
    pub sent: Option<DateTime<Utc>>,
    pub is_read: bool,
    pub is_draft: bool,
    pub from_internet: bool,
    pub headers: Vec<MessageHeader>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub extra_headers: Vec<MessageHeader>,
    pub attachments: Vec<Attachment>,
}

impl NewMsg {
    pub fn empty(folder_id: String) -> Self {
        Self {
            folder_id,
            subject: String::new(),
            body_html: true,
            body: String::new(),
            from: None,
            to: vec![],
            cc: vec![],
            bcc: vec![],
            reply_to: vec![],
            internet_message_id: None,
            conversation_id: None,
            conversation_index: None,
            received: None,
            sent: None,
            is_read: true,
            is_draft: false,
            from_internet: false,
            headers: vec![],
            in_reply_to: None,
            references: vec![],
            extra_headers: vec![],
            attachments: vec![],
        }
    }
}

impl State {
    pub fn new(cfg: SimConfig) -> Self {
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            cfg,
            rng,
            clock_offset: Duration::zero(),
            tenants: vec![],
            users: vec![],
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            refresh_seq: 0,
            subs: BTreeMap::new(),
            faults: vec![],
            next_fault: 0,
            log: VecDeque::new(),
            log_seq: 0,
            stats: StatsAcc::default(),
            inflight: HashMap::new(),
            budget: HashMap::new(),
            sends: vec![],
            pending_sent: vec![],
            outbox: vec![],
            notifications: vec![],
            login_user: None,
            sign_in_as: None,
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    pub fn rand_b64(&mut self, bytes: usize) -> String {
        let mut buf = vec![0u8; bytes];
        self.rng.fill_bytes(&mut buf);
        URL_SAFE_NO_PAD.encode(buf)
    }

    pub fn rand_hex(&mut self, bytes: usize) -> String {
        let mut buf = vec![0u8; bytes];
        self.rng.fill_bytes(&mut buf);
        buf.iter().map(|b| format!("{b:02X}")).collect()
    }

    pub fn guid(&mut self) -> String {
        let mut buf = [0u8; 16];
        self.rng.fill_bytes(&mut buf);
        uuid::Builder::from_random_bytes(buf)
            .into_uuid()
            .to_string()
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random::<f64>() < p
    }

    fn new_plain_id(&mut self) -> String {
        format!("AAMkAG{}AAA=", self.rand_b64(96))
    }
    fn new_immutable_id(&mut self) -> String {
        format!("AAkALg{}AAA=", self.rand_b64(96))
    }
    pub fn new_change_key(&mut self) -> String {
        format!("CQAAABYAAA{}", self.rand_b64(15))
    }
    pub fn new_internet_message_id(&mut self) -> String {
        let host = format!("SN6PR11MB{}", self.rng.random_range(1000..9999));
        format!(
            "<{host}{}@{host}.namprd11.prod.outlook.com>",
            self.rand_hex(12)
        )
    }

    // ---- tenants and users ----

    pub fn create_tenant(&mut self, domain: &str, display_name: &str) -> SimTenant {
        if let Some(t) = self
            .tenants
            .iter()
            .find(|t| t.domain.eq_ignore_ascii_case(domain))
        {
            return t.clone();
        }
        let t = SimTenant {
            id: self.guid(),
            domain: domain.to_string(),
            display_name: display_name.to_string(),
        };
        self.tenants.push(t.clone());
        t
    }

    pub fn tenant(&self, key: &str) -> Option<&SimTenant> {
        self.tenants
            .iter()
            .find(|t| t.id.eq_ignore_ascii_case(key) || t.domain.eq_ignore_ascii_case(key))
    }

    pub fn create_user(
        &mut self,
        tenant: &str,
        upn: &str,
        display_name: &str,
        shared: bool,
    ) -> anyhow::Result<SimUser> {
        let tenant_id = match self.tenant(tenant) {
            Some(t) => t.id.clone(),
            None => {
                let domain = if tenant.contains('.') {
                    tenant.to_string()
                } else {
                    upn.split('@').nth(1).unwrap_or("contoso.com").to_string()
                };
                if tenant.contains('.') || tenant.is_empty() {
                    self.create_tenant(&domain, &domain).id
                } else {
                    bail!("unknown tenant {tenant}")
                }
            }
        };
        if let Some(u) = self.user_idx(upn) {
            return Ok(self.users[u].user.clone());
        }
        let user = SimUser {
            id: self.guid(),
            upn: upn.to_string(),
            mail: Some(upn.to_string()),
            display_name: display_name.to_string(),
            tenant_id,
            shared,
        };
        let mut mailbox = Mailbox::default();
        let root_id = format!("AQMkAD{}AAA=", self.rand_b64(48));
        let root_parent = format!("AQMkAD{}AAA=", self.rand_b64(48));
        mailbox.folders.push(Folder {
            id: root_id.clone(),
            display_name: "Top of Information Store".into(),
            parent_id: root_parent,
            well_known: Some("msgfolderroot"),
            is_hidden: false,
        });
        for (wk, name) in WELL_KNOWN {
            let id = format!("AQMkAD{}AAA=", self.rand_b64(48));
            mailbox.folders.push(Folder {
                id,
                display_name: (*name).into(),
                parent_id: root_id.clone(),
                well_known: Some(wk),
                is_hidden: false,
            });
        }
        self.users.push(UserRec {
            user: user.clone(),
            mailbox,
            revoked: None,
        });
        Ok(user)
    }

    pub fn user_idx(&self, key: &str) -> Option<usize> {
        self.users.iter().position(|u| {
            u.user.id.eq_ignore_ascii_case(key)
                || u.user.upn.eq_ignore_ascii_case(key)
                || u.user
                    .mail
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(key))
        })
    }

    pub fn user_by_id(&self, id: &str) -> Option<&UserRec> {
        self.users.iter().find(|u| u.user.id == id)
    }

    pub fn user_mut(&mut self, key: &str) -> anyhow::Result<&mut UserRec> {
        let i = self
            .user_idx(key)
            .ok_or_else(|| anyhow!("unknown user {key}"))?;
        Ok(&mut self.users[i])
    }

    pub fn user(&self, key: &str) -> anyhow::Result<&UserRec> {
        let i = self
            .user_idx(key)
            .ok_or_else(|| anyhow!("unknown user {key}"))?;
        Ok(&self.users[i])
    }

    pub fn create_folder(
        &mut self,
        user: &str,
        parent: &str,
        name: &str,
    ) -> anyhow::Result<Option<String>> {
        let id = format!("AQMkAD{}AAA=", self.rand_b64(48));
        let u = self.user_mut(user)?;
        let parent_id = u
            .mailbox
            .folder_id(parent)
            .ok_or_else(|| anyhow!("unknown folder {parent}"))?;
        if u.mailbox
            .folders
            .iter()
            .any(|f| f.parent_id == parent_id && f.display_name.eq_ignore_ascii_case(name))
        {
            return Ok(None);
        }
        u.mailbox.folders.push(Folder {
            id: id.clone(),
            display_name: name.to_string(),
            parent_id,
            well_known: None,
            is_hidden: false,
        });
        Ok(Some(id))
    }

    // ---- messages ----

    pub fn add_message(&mut self, user_id: &str, nm: NewMsg) -> anyhow::Result<(String, String)> {
        let now = self.now();
        let id = self.new_plain_id();
        let imm = self.new_immutable_id();
        let ck = self.new_change_key();
        let imid = match nm.internet_message_id {
            Some(i) => i,
            None => self.new_internet_message_id(),
        };
        let conv_index = match nm.conversation_index {
            Some(c) => c,
            None => {
                let mut b = vec![1u8; 22];
                self.rng.fill_bytes(&mut b[1..]);
                b
            }
        };
        let new_conv = format!("AAQkAG{}=", self.rand_b64(45));
        let u = self.user_mut(user_id)?;
        let mb = &mut u.mailbox;
        let conversation_id = nm
            .conversation_id
            .or_else(|| {
                // Exchange threads a reply into the conversation of the message it answers.
                let refs = nm.in_reply_to.iter().chain(nm.references.iter().rev());
                for r in refs {
                    if let Some(m) = mb.by_internet_id(r) {
                        return Some(m.conversation_id.clone());
                    }
                }
                None
            })
            .unwrap_or(new_conv);
        let version = mb.tick();
        let received = nm.received.unwrap_or(now);
        let msg = Msg {
            id: id.clone(),
            immutable_id: imm.clone(),
            folder_id: nm.folder_id.clone(),
            internet_message_id: imid,
            conversation_id,
            conversation_index: conv_index,
            subject: nm.subject,
            body_html: nm.body_html,
            body: nm.body,
            sender: nm.from.clone(),
            from: nm.from,
            to: nm.to,
            cc: nm.cc,
            bcc: nm.bcc,
            reply_to: nm.reply_to,
            received,
            sent: nm.sent.or(if nm.is_draft { None } else { Some(received) }),
            created: now.min(received),
            last_modified: now,
            is_read: nm.is_read,
            is_draft: nm.is_draft,
            change_key: ck,
            headers: nm.headers,
            from_internet: nm.from_internet,
            in_reply_to: nm.in_reply_to,
            references: nm.references,
            extra_headers: nm.extra_headers,
            attachments: nm.attachments,
            importance: "normal".into(),
            version,
            field_versions: HashMap::new(),
        };
        let folder = msg.folder_id.clone();
        mb.insert(msg);
        self.emit_change(user_id, &folder, &imm, "created");
        Ok((id, imm))
    }

    pub fn deliver(&mut self, user: &str, mail: InboundMail) -> anyhow::Result<DeliveredMessage> {
        let now = self.now();
        let ui = self
            .user_idx(user)
            .ok_or_else(|| anyhow!("unknown user {user}"))?;
        let owner = self.users[ui].user.clone();
        let folder_key = mail.folder.clone().unwrap_or_else(|| "inbox".into());
        let folder_id = self.users[ui]
            .mailbox
            .folder_id(&folder_key)
            .ok_or_else(|| anyhow!("unknown folder {folder_key}"))?;
        let message_id = match mail.message_id.clone() {
            Some(m) => m,
            None => {
                let domain = mail
                    .from
                    .address
                    .split('@')
                    .nth(1)
                    .unwrap_or("example.net")
                    .to_string();
                format!("<{}@{}>", self.rand_hex(10).to_lowercase(), domain)
            }
        };
        let from = if mail.from.address.is_empty() {
            EmailAddress::new("Sender", "sender@example.net")
        } else {
            mail.from.clone()
        };
        let to = if mail.to.is_empty() {
            vec![EmailAddress::new(
                owner.display_name.clone(),
                owner.mail.clone().unwrap_or(owner.upn.clone()),
            )]
        } else {
            mail.to.clone()
        };
        let received = mail.received.unwrap_or(now);
        let (body_html, body) = match (&mail.html_body, &mail.text_body) {
            (Some(h), _) => (true, h.clone()),
            (None, Some(t)) => (false, t.clone()),
            (None, None) => (false, String::new()),
        };
        let fmt_addr = |a: &EmailAddress| {
            if a.name.is_empty() {
                a.address.clone()
            } else {
                format!("\"{}\" <{}>", a.name, a.address)
            }
        };
        let mut headers = vec![
            MessageHeader::new(
                "Received",
                format!(
                    "from mail.example.net (203.0.113.7) by SN6PR11MB2638.namprd11.prod.outlook.com with Microsoft SMTP Server; {}",
                    received.to_rfc2822()
                ),
            ),
            MessageHeader::new("From", fmt_addr(&from)),
            MessageHeader::new("To", to.iter().map(fmt_addr).collect::<Vec<_>>().join(", ")),
        ];
        if !mail.cc.is_empty() {
            headers.push(MessageHeader::new(
                "CC",
                mail.cc.iter().map(fmt_addr).collect::<Vec<_>>().join(", "),
            ));
        }
        headers.push(MessageHeader::new("Subject", mail.subject.clone()));
        headers.push(MessageHeader::new("Date", received.to_rfc2822()));
        headers.push(MessageHeader::new("Message-ID", message_id.clone()));
        if let Some(irt) = &mail.in_reply_to {
            headers.push(MessageHeader::new("In-Reply-To", irt.clone()));
        }
        if !mail.references.is_empty() {
            headers.push(MessageHeader::new("References", mail.references.join(" ")));
        }
        headers.extend(mail.headers.iter().cloned());
        headers.push(MessageHeader::new("MIME-Version", "1.0"));
        headers.push(MessageHeader::new(
            "Content-Type",
            if body_html {
                "text/html; charset=\"utf-8\""
            } else {
                "text/plain; charset=\"utf-8\""
            },
        ));
        let mut attachments = vec![];
        for a in &mail.attachments {
            let bytes = STANDARD
                .decode(a.content_bytes.as_bytes())
                .context("attachment content_bytes is not base64")?;
            attachments.push(Attachment {
                id: format!("AAMkAGAtt{}=", self.rand_b64(30)),
                name: a.name.clone(),
                content_type: if a.content_type.is_empty() {
                    "application/octet-stream".into()
                } else {
                    a.content_type.clone()
                },
                bytes,
                is_inline: a.is_inline,
                content_id: a.content_id.clone(),
                last_modified: received,
            });
        }
        let nm = NewMsg {
            folder_id: folder_id.clone(),
            subject: mail.subject,
            body_html,
            body,
            from: Some(from),
            to,
            cc: mail.cc,
            bcc: vec![],
            reply_to: mail.reply_to,
            internet_message_id: Some(message_id.clone()),
            conversation_id: mail.conversation_id,
            conversation_index: None,
            received: Some(received),
            sent: Some(received),
            is_read: mail.is_read,
            is_draft: false,
            from_internet: true,
            headers,
            in_reply_to: mail.in_reply_to,
            references: mail.references,
            extra_headers: mail.headers,
            attachments,
        };
        let (id, imm) = self.add_message(&owner.id, nm)?;
        let conv = self.users[ui]
            .mailbox
            .msg(&id)
            .map(|m| m.conversation_id.clone())
            .unwrap_or_default();
        Ok(DeliveredMessage {
            id,
            immutable_id: imm,
            internet_message_id: message_id,
            conversation_id: conv,
            folder_id,
        })
    }

    /// Moves a message; the plain id changes (Exchange copies on move), the immutable id stays.
    pub fn move_message(
        &mut self,
        user: &str,
        msg_id: &str,
        dest: &str,
    ) -> anyhow::Result<MessageRef> {
        let new_id = self.new_plain_id();
        let ck = self.new_change_key();
        let now = self.now();
        let ui = self
            .user_idx(user)
            .ok_or_else(|| anyhow!("unknown user {user}"))?;
        let uid = self.users[ui].user.id.clone();
        let mb = &mut self.users[ui].mailbox;
        let dest_id = mb
            .folder_id(dest)
            .ok_or_else(|| anyhow!("unknown folder {dest}"))?;
        let seq = mb
            .seq_of(msg_id)
            .ok_or_else(|| anyhow!("unknown message {msg_id}"))?;
        let mut m = mb.remove(seq).ok_or_else(|| anyhow!("gone"))?;
        let old_folder = m.folder_id.clone();
        if old_folder == dest_id {
            let r = MessageRef {
                id: m.id.clone(),
                immutable_id: m.immutable_id.clone(),
                folder_id: dest_id,
            };
            mb.insert(m);
            return Ok(r);
        }
        let v = mb.tick();
        m.id = new_id;
        m.folder_id = dest_id.clone();
        m.change_key = ck;
        m.last_modified = now;
        m.version = v;
        m.field_versions.insert("parentFolderId", v);
        let r = MessageRef {
            id: m.id.clone(),
            immutable_id: m.immutable_id.clone(),
            folder_id: dest_id.clone(),
        };
        mb.insert(m);
        self.emit_change(&uid, &old_folder, &r.immutable_id, "deleted");
        self.emit_change(&uid, &dest_id, &r.immutable_id, "created");
        Ok(r)
    }

    pub fn delete_message(&mut self, user: &str, msg_id: &str) -> anyhow::Result<()> {
        let ui = self
            .user_idx(user)
            .ok_or_else(|| anyhow!("unknown user {user}"))?;
        let uid = self.users[ui].user.id.clone();
        let mb = &mut self.users[ui].mailbox;
        let seq = mb
            .seq_of(msg_id)
            .ok_or_else(|| anyhow!("unknown message {msg_id}"))?;
        let m = mb.remove(seq).ok_or_else(|| anyhow!("gone"))?;
        mb.tick();
        self.emit_change_removed(&uid, &m);
        Ok(())
    }

    /// Applies field updates and bumps versions so delta reports them as partial updates.
    pub fn touch(&mut self, user_id: &str, msg_id: &str, fields: &[&'static str]) {
        let ck = self.new_change_key();
        let now = self.now();
        let Some(u) = self.users.iter_mut().find(|u| u.user.id == user_id) else {
            return;
        };
        let v = u.mailbox.tick();
        let Some(m) = u.mailbox.msg_mut(msg_id) else {
            return;
        };
        m.version = v;
        m.change_key = ck;
        m.last_modified = now;
        for f in fields {
            m.field_versions.insert(f, v);
        }
        let (folder, imm) = (m.folder_id.clone(), m.immutable_id.clone());
        self.emit_change(user_id, &folder, &imm, "updated");
    }

    // ---- notifications ----

    fn emit_change(&mut self, user_id: &str, folder_id: &str, imm: &str, change: &str) {
        let now = self.now();
        let Some(u) = self.users.iter().find(|u| u.user.id == user_id) else {
            return;
        };
        let Some(m) = u.mailbox.msg(imm) else {
            return;
        };
        let mut out = vec![];
        for s in self.subs.values() {
            if s.user_id != user_id || s.expiration <= now {
                continue;
            }
            if s.folder_id.as_deref().is_some_and(|f| f != folder_id) {
                continue;
            }
            if !s.change_type.split(',').any(|c| c.trim() == change) {
                continue;
            }
            out.push(Outgoing::Change {
                sub_id: s.id.clone(),
                url: s.notification_url.clone(),
                item: change_item(s, user_id, m.out_id(s.immutable), &m.change_key, change),
                change: change.to_string(),
            });
        }
        self.outbox.extend(out);
    }

    fn emit_change_removed(&mut self, user_id: &str, m: &Msg) {
        let now = self.now();
        let mut out = vec![];
        for s in self.subs.values() {
            if s.user_id != user_id || s.expiration <= now {
                continue;
            }
            if s.folder_id.as_deref().is_some_and(|f| f != m.folder_id) {
                continue;
            }
            if !s.change_type.split(',').any(|c| c.trim() == "deleted") {
                continue;
            }
            out.push(Outgoing::Change {
                sub_id: s.id.clone(),
                url: s.notification_url.clone(),
                item: change_item(s, user_id, m.out_id(s.immutable), &m.change_key, "deleted"),
                change: "deleted".into(),
            });
        }
        self.outbox.extend(out);
    }

    pub fn lifecycle(&mut self, sub_id: &str, event: LifecycleEvent) -> bool {
        let Some(s) = self.subs.get(sub_id).cloned() else {
            return false;
        };
        let Some(url) = s.lifecycle_url.clone() else {
            return false;
        };
        let item = json!({
            "subscriptionId": s.id,
            "subscriptionExpirationDateTime": fmt_dt_offset(s.expiration),
            "tenantId": s.tenant_id,
            "clientState": s.client_state,
            "lifecycleEvent": event.as_str(),
        });
        self.outbox.push(Outgoing::Lifecycle {
            sub_id: s.id.clone(),
            url,
            item,
            event: event.as_str().into(),
        });
        if event == LifecycleEvent::SubscriptionRemoved {
            self.subs.remove(sub_id);
        }
        true
    }

    /// Graph deletes a subscription once its expirationDateTime has passed: it is no longer
    /// listed, and GET, PATCH (renew) and DELETE of it answer 404.
    pub fn drop_expired_subscriptions(&mut self) {
        let now = self.now();
        self.subs.retain(|_, s| s.expiration > now);
    }

    /// Sent Items copies whose delay elapsed become visible now.
    pub fn materialize_pending(&mut self) {
        self.drop_expired_subscriptions();
        let now = self.now();
        if self.pending_sent.iter().all(|p| p.due > now) {
            return;
        }
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_sent)
            .into_iter()
            .partition(|p| p.due <= now);
        self.pending_sent = keep;
        for p in due {
            let Some(u) = self.users.iter_mut().find(|u| u.user.id == p.user_id) else {
                continue;
            };
            let v = u.mailbox.tick();
            let mut m = p.msg;
            m.version = v;
            let (folder, imm) = (m.folder_id.clone(), m.immutable_id.clone());
            u.mailbox.insert(m);
            self.emit_change(&p.user_id, &folder, &imm, "created");
        }
    }

    // ---- faults ----

    pub fn add_fault(&mut self, rule: FaultRule) -> FaultId {
        self.next_fault += 1;
        let id = FaultId(self.next_fault);
        self.faults.push((id.clone(), rule, 0));
        id
    }

    fn phase_of(kind: &FaultKind) -> &'static [Phase] {
        match kind {
            FaultKind::TokenError { .. } | FaultKind::InvalidClient => &[Phase::Token],
            FaultKind::AuthorizeError { .. } => &[Phase::Authorize],
            FaultKind::SentItemsDelay { .. } => &[Phase::Send],
            FaultKind::SubscriptionValidationTimeout => &[Phase::SubscriptionCreate],
            FaultKind::ReplayDeltaItems => &[Phase::Delta],
            FaultKind::Delay { .. }
            | FaultKind::TooManyRequests { .. }
            | FaultKind::ServiceUnavailable { .. }
            | FaultKind::GatewayTimeout
            | FaultKind::ConnectionReset => &[Phase::Request, Phase::Token],
            FaultKind::InvalidAuthenticationToken
            | FaultKind::DeltaEviction
            | FaultKind::GraphError { .. } => &[Phase::Request],
        }
    }

    /// Consumes matching faults: every matching delay, plus the first other matching fault.
    pub fn take_faults(
        &mut self,
        phase: Phase,
        method: &str,
        path_and_query: &str,
        mailbox_user_id: Option<&str>,
    ) -> Vec<FaultKind> {
        let mailbox = mailbox_user_id.and_then(|id| self.user_by_id(id).map(|u| u.user.clone()));
        let mut out = vec![];
        let mut have_terminal = false;
        let mut i = 0;
        while i < self.faults.len() {
            let (_, rule, used) = &self.faults[i];
            let is_delay = matches!(rule.kind, FaultKind::Delay { .. });
            let applies = Self::phase_of(&rule.kind).contains(&phase)
                && (is_delay || !have_terminal)
                && rule
                    .method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && rule
                    .path_contains
                    .as_deref()
                    .is_none_or(|p| path_and_query.contains(p))
                && rule.mailbox.as_deref().is_none_or(|k| {
                    mailbox.as_ref().is_some_and(|u| {
                        u.id.eq_ignore_ascii_case(k)
                            || u.upn.eq_ignore_ascii_case(k)
                            || u.mail.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(k))
                    })
                })
                && rule.count.is_none_or(|c| *used < c);
            if !applies {
                i += 1;
                continue;
            }
            if let Some(p) = rule.probability
                && !self.chance(p)
            {
                i += 1;
                continue;
            }
            let (_, rule, used) = &mut self.faults[i];
            *used += 1;
            if !is_delay {
                have_terminal = true;
            }
            out.push(rule.kind.clone());
            if rule.count.is_some_and(|c| *used >= c) {
                self.faults.remove(i);
            } else {
                i += 1;
            }
        }
        out
    }

    // ---- tokens ----

    pub fn normalize_scopes(raw: &str) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for s in raw.split_whitespace() {
            let s = s
                .strip_prefix("https://graph.microsoft.com/")
                .unwrap_or(s)
                .to_string();
            if s == ".default" {
                for d in [
                    "User.Read",
                    "Mail.ReadWrite",
                    "Mail.Send",
                    "Mail.ReadWrite.Shared",
                    "Mail.Send.Shared",
                ] {
                    out.push(d.into());
                }
            } else if !out.iter().any(|o| o.eq_ignore_ascii_case(&s)) {
                out.push(s);
            }
        }
        out
    }

    pub fn issue_tokens(
        &mut self,
        user_id: &str,
        scopes: &[String],
        nonce: Option<&str>,
    ) -> TokenResponse {
        let now = self.now();
        let lifetime = self.cfg.access_token_lifetime_secs;
        let user = self
            .user_by_id(user_id)
            .map(|u| u.user.clone())
            .unwrap_or_else(|| SimUser {
                id: user_id.into(),
                upn: String::new(),
                mail: None,
                display_name: String::new(),
                tenant_id: String::new(),
                shared: false,
            });
        let has = |s: &str| scopes.iter().any(|x| x.eq_ignore_ascii_case(s));
        let graph_scopes: Vec<String> = scopes
            .iter()
            .filter(|s| {
                !["offline_access", "openid", "profile", "email"]
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(s))
            })
            .cloned()
            .collect();
        let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"RS256","kid":"graph-sim"}"#);
        let uti = self.rand_b64(16);
        let sig = self.rand_b64(64);
        let exp = now + Duration::seconds(lifetime as i64);
        let claims = json!({
            "aud": "00000003-0000-0000-c000-000000000000",
            "iss": format!("https://sts.windows.net/{}/", user.tenant_id),
            "iat": now.timestamp(), "nbf": now.timestamp(), "exp": exp.timestamp(),
            "appid": self.cfg.client_id, "oid": user.id, "tid": user.tenant_id,
            "upn": user.upn, "unique_name": user.upn, "name": user.display_name,
            "scp": graph_scopes.join(" "), "uti": uti, "ver": "1.0",
        });
        let access = format!(
            "{header}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        self.access.insert(
            access.clone(),
            AccessGrant {
                user_id: user_id.into(),
                scopes: graph_scopes.clone(),
                expires: exp,
            },
        );
        let refresh_token = if has("offline_access") {
            self.refresh_seq += 1;
            let rt = format!("1.AQ{}", self.rand_b64(180));
            self.refresh.insert(
                rt.clone(),
                RefreshGrant {
                    user_id: user_id.into(),
                    client_id: self.cfg.client_id.clone(),
                    scopes: scopes.to_vec(),
                    seq: self.refresh_seq,
                    last_used: now,
                    issued: now,
                },
            );
            Some(rt)
        } else {
            None
        };
        let id_token = if has("openid") {
            let c = json!({
                "aud": self.cfg.client_id,
                "iss": format!("https://login.microsoftonline.com/{}/v2.0", user.tenant_id),
                "iat": now.timestamp(), "nbf": now.timestamp(), "exp": exp.timestamp(),
                "name": user.display_name, "oid": user.id, "tid": user.tenant_id,
                "preferred_username": user.upn, "email": user.mail, "sub": user.id,
                "nonce": nonce, "ver": "2.0",
            });
            Some(format!(
                "{header}.{}.{}",
                URL_SAFE_NO_PAD.encode(c.to_string()),
                self.rand_b64(64)
            ))
        } else {
            None
        };
        let mut scope_out = graph_scopes.clone();
        for o in ["openid", "profile", "email"] {
            if has(o) {
                scope_out.push(o.into());
            }
        }
        TokenResponse {
            token_type: "Bearer".into(),
            expires_in: lifetime,
            ext_expires_in: lifetime,
            scope: scope_out.join(" "),
            access_token: access,
            refresh_token,
            id_token,
        }
    }

    // ---- log ----

    pub fn record(&mut self, mut e: LogEntry) {
        self.log_seq += 1;
        e.seq = self.log_seq;
        self.stats.total += 1;
        *self
            .stats
            .by_route
            .entry(e.route.clone())
            .or_default()
            .entry(e.status)
            .or_default() += 1;
        *self.stats.by_status.entry(e.status).or_default() += 1;
        if e.status == 429 {
            self.stats.throttled += 1;
        }
        if e.status == 0 {
            self.stats.resets += 1;
        }
        if let Some(g) = &e.grant_type {
            *self.stats.grants.entry(g.clone()).or_default() += 1;
        }
        self.log.push_back(e);
        while self.log.len() > self.cfg.request_log_capacity {
            self.log.pop_front();
        }
    }

    pub fn stats(&self) -> SimStats {
        SimStats {
            total_requests: self.stats.total,
            by_route: self.stats.by_route.clone(),
            by_status: self.stats.by_status.clone(),
            max_concurrency: self.stats.max_conc.clone(),
            token_requests_by_grant: self.stats.grants.clone(),
            throttled: self.stats.throttled,
            sends: self.sends.len(),
            notifications_sent: self.stats.notifications,
            connection_resets: self.stats.resets,
        }
    }

    pub fn sim_message(&self, mb: &Mailbox, m: &Msg) -> SimMessage {
        SimMessage {
            id: m.id.clone(),
            immutable_id: m.immutable_id.clone(),
            folder_id: m.folder_id.clone(),
            folder: mb
                .folder(&m.folder_id)
                .map(|f| f.display_name.clone())
                .unwrap_or_default(),
            internet_message_id: m.internet_message_id.clone(),
            conversation_id: m.conversation_id.clone(),
            subject: m.subject.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            cc: m.cc.clone(),
            body_content_type: if m.body_html { "html" } else { "text" }.into(),
            body: m.body.clone(),
            is_draft: m.is_draft,
            is_read: m.is_read,
            received: m.received,
            sent: m.sent,
            headers: m.headers.clone(),
            in_reply_to: m.in_reply_to.clone(),
            references: m.references.clone(),
            attachment_names: m.attachments.iter().map(|a| a.name.clone()).collect(),
        }
    }
}

pub(crate) fn fmt_dt(d: DateTime<Utc>) -> String {
    d.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(crate) fn fmt_dt_offset(d: DateTime<Utc>) -> String {
    // Graph writes 7 fractional digits, which chrono has no specifier for.
    format!(
        "{}.{:07}+00:00",
        d.format("%Y-%m-%dT%H:%M:%S"),
        d.timestamp_subsec_nanos() / 100
    )
}

fn change_item(
    s: &Subscription,
    user_id: &str,
    mid: &str,
    change_key: &str,
    change: &str,
) -> Value {
    let resource = format!("Users/{user_id}/Messages/{mid}");
    json!({
        "id": null,
        "subscriptionId": s.id,
        "subscriptionExpirationDateTime": fmt_dt_offset(s.expiration),
        "changeType": change,
        "resource": resource,
        "clientState": s.client_state,
        "tenantId": s.tenant_id,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Message",
            "@odata.id": resource,
            "@odata.etag": format!("W/\"{change_key}\""),
            "id": mid,
        }
    })
}
