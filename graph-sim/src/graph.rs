//! Graph v1.0 routes: users, mail folders, messages, delta, send flows, attachments, `$batch`.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::Duration;
use rand::seq::SliceRandom;
use serde_json::{Map, Value, json};

use crate::GraphSim;
use crate::model::*;
use crate::odata;
use crate::server::{Ctx, Outcome, SimRequest, SimResponse, split_path, sync_state_not_found};
use crate::state::*;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Target {
    Me,
    User(String),
    None,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Need {
    Profile,
    MailBasic,
    MailRead,
    MailWrite,
    MailSend,
    Any,
}

#[derive(Clone, Debug)]
pub(crate) struct Classified {
    pub template: String,
    pub target: Target,
    pub params: Vec<String>,
    pub need: Need,
    /// Outlook (mailbox) routes are subject to per-mailbox throttling.
    pub mailbox_scoped: bool,
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Maps path segments (after `/v1.0`) to a route template. `Err(segment)` = unknown segment.
pub(crate) fn classify(method: &str, segs: &[String]) -> Result<Classified, String> {
    let mk = |t: &str, target: Target, params: Vec<String>, need: Need, mb: bool| Classified {
        template: t.to_string(),
        target,
        params,
        need,
        mailbox_scoped: mb,
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        [] => return Err(String::new()),
        ["$batch"] => return Ok(mk("/$batch", Target::None, vec![], Need::Any, false)),
        [x] if eq(x, "subscriptions") => {
            return Ok(mk("/subscriptions", Target::None, vec![], Need::Any, false));
        }
        [x, id] if eq(x, "subscriptions") => {
            return Ok(mk(
                "/subscriptions/{id}",
                Target::None,
                vec![id.to_string()],
                Need::Any,
                false,
            ));
        }
        [x, id, r] if eq(x, "subscriptions") && eq(r, "reauthorize") => {
            return Ok(mk(
                "/subscriptions/{id}/reauthorize",
                Target::None,
                vec![id.to_string()],
                Need::Any,
                false,
            ));
        }
        [x] if eq(x, "users") => {
            return Ok(mk("/users", Target::None, vec![], Need::Profile, false));
        }
        _ => {}
    }
    let (target, tail): (Target, &[&str]) = match s.as_slice() {
        [me, rest @ ..] if eq(me, "me") => (Target::Me, rest),
        [u, key, rest @ ..] if eq(u, "users") => (Target::User(key.to_string()), rest),
        [first, ..] => return Err(first.to_string()),
        [] => return Err(String::new()),
    };
    let p = |v: &[&&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let c = match tail {
        [] => mk("/me", target, vec![], Need::Profile, false),
        [mf] if eq(mf, "mailFolders") => mk(
            "/me/mailFolders",
            target,
            vec![],
            if method == "POST" {
                Need::MailWrite
            } else {
                Need::MailBasic
            },
            true,
        ),
        [mf, f] if eq(mf, "mailFolders") => mk(
            "/me/mailFolders/{id}",
            target,
            p(&[f]),
            Need::MailBasic,
            true,
        ),
        [mf, f, cf] if eq(mf, "mailFolders") && eq(cf, "childFolders") => mk(
            "/me/mailFolders/{id}/childFolders",
            target,
            p(&[f]),
            if method == "POST" {
                Need::MailWrite
            } else {
                Need::MailBasic
            },
            true,
        ),
        [mf, f, m] if eq(mf, "mailFolders") && eq(m, "messages") => mk(
            "/me/mailFolders/{id}/messages",
            target,
            p(&[f]),
            if method == "POST" {
                Need::MailWrite
            } else {
                Need::MailBasic
            },
            true,
        ),
        [mf, f, m, d] if eq(mf, "mailFolders") && eq(m, "messages") && eq(d, "delta") => mk(
            "/me/mailFolders/{id}/messages/delta",
            target,
            p(&[f]),
            Need::MailBasic,
            true,
        ),
        [mf, _f, m, rest @ ..] if eq(mf, "mailFolders") && eq(m, "messages") => {
            let mut v = vec!["messages".to_string()];
            v.extend(rest.iter().map(|x| x.to_string()));
            let mut inner =
                classify_message(method, &v.iter().map(String::as_str).collect::<Vec<_>>())?;
            inner.0 = format!(
                "/me/mailFolders/{{id}}{}",
                inner.0.trim_start_matches("/me")
            );
            mk(&inner.0, target, inner.1, inner.2, true)
        }
        [sm] if eq(sm, "sendMail") => mk("/me/sendMail", target, vec![], Need::MailSend, true),
        [m, ..] if eq(m, "messages") => {
            let (t, params, need) = classify_message(method, tail)?;
            mk(&t, target, params, need, true)
        }
        [first, ..] => return Err(first.to_string()),
    };
    Ok(c)
}

fn classify_message(method: &str, tail: &[&str]) -> Result<(String, Vec<String>, Need), String> {
    let write = |m: &str| {
        if m == "GET" {
            Need::MailBasic
        } else {
            Need::MailWrite
        }
    };
    Ok(match tail {
        [_] => ("/me/messages".into(), vec![], write(method)),
        [_, id] => (
            "/me/messages/{id}".into(),
            vec![id.to_string()],
            write(method),
        ),
        [_, id, v] if *v == "$value" => (
            "/me/messages/{id}/$value".into(),
            vec![id.to_string()],
            Need::MailRead,
        ),
        [_, id, a] if eq(a, "attachments") => (
            "/me/messages/{id}/attachments".into(),
            vec![id.to_string()],
            if method == "GET" {
                Need::MailRead
            } else {
                Need::MailWrite
            },
        ),
        [_, id, a, aid] if eq(a, "attachments") => (
            "/me/messages/{id}/attachments/{id}".into(),
            vec![id.to_string(), aid.to_string()],
            Need::MailRead,
        ),
        [_, id, action] => {
            const ACTIONS: &[&str] = &[
                "createReply",
                "createReplyAll",
                "createForward",
                "reply",
                "replyAll",
                "forward",
                "send",
                "move",
                "copy",
            ];
            let Some(a) = ACTIONS.iter().find(|a| eq(a, action)) else {
                return Err(action.to_string());
            };
            let need = match *a {
                "reply" | "replyAll" | "forward" | "send" => Need::MailSend,
                _ => Need::MailWrite,
            };
            (
                format!("/me/messages/{{id}}/{a}"),
                vec![id.to_string()],
                need,
            )
        }
        [_, _, x, ..] => return Err(x.to_string()),
        [] => return Err(String::new()),
    })
}

fn scope_ok(scopes: &[String], need: Need, shared: bool) -> bool {
    let has = |s: &str| {
        scopes.iter().any(|x| {
            x.eq_ignore_ascii_case(s) || (shared && x.eq_ignore_ascii_case(&format!("{s}.Shared")))
        })
    };
    let has_shared_only = |s: &str| {
        if shared {
            scopes
                .iter()
                .any(|x| x.eq_ignore_ascii_case(&format!("{s}.Shared")))
        } else {
            scopes.iter().any(|x| x.eq_ignore_ascii_case(s))
        }
    };
    match need {
        Need::Any => true,
        Need::Profile => [
            "User.Read",
            "User.ReadWrite",
            "User.ReadBasic.All",
            "User.Read.All",
        ]
        .iter()
        .any(|s| scopes.iter().any(|x| x.eq_ignore_ascii_case(s))),
        Need::MailBasic => ["Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite"]
            .iter()
            .any(|s| has_shared_only(s) || (!shared && has(s))),
        Need::MailRead => ["Mail.Read", "Mail.ReadWrite"]
            .iter()
            .any(|s| has_shared_only(s)),
        Need::MailWrite => has_shared_only("Mail.ReadWrite"),
        Need::MailSend => has_shared_only("Mail.Send"),
    }
}

/// Per-request view options.
pub(crate) struct View {
    pub imm: bool,
    pub body_html: Option<bool>,
    pub base: String,
}

pub(crate) fn addr_json(a: &EmailAddress) -> Value {
    json!({"emailAddress": {"name": a.name, "address": a.address}})
}

fn addrs_json(v: &[EmailAddress]) -> Value {
    Value::Array(v.iter().map(addr_json).collect())
}

pub(crate) fn prop_value(m: &Msg, prop: &str, view: &View) -> Option<Value> {
    Some(match prop {
        "id" => json!(m.out_id(view.imm)),
        "createdDateTime" => json!(fmt_dt(m.created)),
        "lastModifiedDateTime" => json!(fmt_dt(m.last_modified)),
        "changeKey" => json!(m.change_key),
        "categories" => json!([]),
        "receivedDateTime" => json!(fmt_dt(m.received)),
        "sentDateTime" => m.sent.map(|d| json!(fmt_dt(d))).unwrap_or(Value::Null),
        "hasAttachments" => json!(m.attachments.iter().any(|a| !a.is_inline)),
        "internetMessageId" => json!(m.internet_message_id),
        "subject" => json!(m.subject),
        "bodyPreview" => json!(preview(m)),
        "importance" => json!(m.importance),
        "parentFolderId" => json!(m.folder_id),
        "conversationId" => json!(m.conversation_id),
        "conversationIndex" => json!(STANDARD.encode(&m.conversation_index)),
        "isDeliveryReceiptRequested" => json!(false),
        "isReadReceiptRequested" => json!(false),
        "isRead" => json!(m.is_read),
        "isDraft" => json!(m.is_draft),
        "webLink" => json!(format!(
            "https://outlook.office365.com/owa/?ItemID={}&exvsurl=1&viewmodel=ReadMessageItem",
            m.id
        )),
        "inferenceClassification" => json!("focused"),
        "body" | "uniqueBody" => {
            let (html, content) = match view.body_html {
                Some(true) if !m.body_html => (true, text_to_html(&m.body)),
                Some(false) if m.body_html => (false, html_to_text(&m.body)),
                _ => (m.body_html, m.body.clone()),
            };
            json!({"contentType": if html { "html" } else { "text" }, "content": content})
        }
        "sender" => m.sender.as_ref().map(addr_json).unwrap_or(Value::Null),
        "from" => m.from.as_ref().map(addr_json).unwrap_or(Value::Null),
        "toRecipients" => addrs_json(&m.to),
        "ccRecipients" => addrs_json(&m.cc),
        "bccRecipients" => addrs_json(&m.bcc),
        "replyTo" => addrs_json(&m.reply_to),
        "flag" => json!({"flagStatus": "notFlagged"}),
        "internetMessageHeaders" => {
            if !m.from_internet {
                return None;
            }
            Value::Array(
                m.headers
                    .iter()
                    .map(|h| json!({"name": h.name, "value": h.value}))
                    .collect(),
            )
        }
        _ => return None,
    })
}

pub(crate) fn render_msg(m: &Msg, select: Option<&[String]>, view: &View) -> Value {
    let mut o = Map::new();
    o.insert(
        "@odata.etag".into(),
        json!(format!("W/\"{}\"", m.change_key)),
    );
    o.insert("id".into(), json!(m.out_id(view.imm)));
    let props = match select {
        Some(s) => s.to_vec(),
        None => odata::default_props(),
    };
    for p in props {
        if p == "id" {
            continue;
        }
        if let Some(v) = prop_value(m, &p, view) {
            o.insert(p, v);
        }
    }
    Value::Object(o)
}

fn folder_json(mb: &Mailbox, f: &Folder) -> Value {
    let msgs: Vec<&Msg> = mb.in_folder(&f.id).collect();
    json!({
        "id": f.id,
        "displayName": f.display_name,
        "parentFolderId": f.parent_id,
        "childFolderCount": mb.folders.iter().filter(|c| c.parent_id == f.id).count(),
        "unreadItemCount": msgs.iter().filter(|m| !m.is_read).count(),
        "totalItemCount": msgs.len(),
        "sizeInBytes": msgs.iter().map(|m| m.body.len()).sum::<usize>(),
        "isHidden": f.is_hidden,
    })
}

pub(crate) fn query_params(q: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// `$top` and `top` both work, case-insensitively, as in Graph.
pub(crate) fn qp<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| {
            let k = k.trim_start_matches('$');
            k.eq_ignore_ascii_case(name)
        })
        .map(|(_, v)| v.as_str())
}

fn encode_query(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| {
            let v: String = url::form_urlencoded::byte_serialize(v.as_bytes())
                .collect::<String>()
                .replace('+', "%20");
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn with_param(params: &[(String, String)], name: &str, value: String) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !k.trim_start_matches('$').eq_ignore_ascii_case(name))
        .cloned()
        .collect();
    out.push((format!("${name}"), value));
    out
}

fn parse_addrs(v: &Value) -> Result<Vec<EmailAddress>, String> {
    let Some(arr) = v.as_array() else {
        return Err("Recipients must be an array.".into());
    };
    let mut out = vec![];
    for r in arr {
        let e = &r["emailAddress"];
        let address = e["address"].as_str().unwrap_or("").to_string();
        let name = e["name"].as_str().unwrap_or("").to_string();
        out.push(EmailAddress { name, address });
    }
    Ok(out)
}

#[derive(Default)]
struct MsgPatch {
    subject: Option<String>,
    body: Option<(bool, String)>,
    to: Option<Vec<EmailAddress>>,
    cc: Option<Vec<EmailAddress>>,
    bcc: Option<Vec<EmailAddress>>,
    reply_to: Option<Vec<EmailAddress>>,
    importance: Option<String>,
    is_read: Option<bool>,
    headers: Option<Vec<MessageHeader>>,
    attachments: Vec<Attachment>,
}

fn parse_patch(v: &Value, st: &mut State) -> Result<MsgPatch, (String, String)> {
    let bad = |m: String| ("ErrorInvalidRequest".to_string(), m);
    let mut p = MsgPatch::default();
    let Some(o) = v.as_object() else {
        return Err(bad("The message must be a JSON object.".into()));
    };
    for (k, val) in o {
        match k.as_str() {
            "subject" => p.subject = Some(val.as_str().unwrap_or("").to_string()),
            "body" => {
                let html = val["contentType"]
                    .as_str()
                    .is_some_and(|c| c.eq_ignore_ascii_case("html"));
                p.body = Some((html, val["content"].as_str().unwrap_or("").to_string()));
            }
            "toRecipients" => p.to = Some(parse_addrs(val).map_err(bad)?),
            "ccRecipients" => p.cc = Some(parse_addrs(val).map_err(bad)?),
            "bccRecipients" => p.bcc = Some(parse_addrs(val).map_err(bad)?),
            "replyTo" => p.reply_to = Some(parse_addrs(val).map_err(bad)?),
            "importance" => p.importance = val.as_str().map(str::to_string),
            "isRead" => p.is_read = val.as_bool(),
            "internetMessageHeaders" => {
                let mut hs = vec![];
                for h in val.as_array().cloned().unwrap_or_default() {
                    let name = h["name"].as_str().unwrap_or("").to_string();
                    if !name.to_ascii_lowercase().starts_with("x-") {
                        return Err((
                            "InvalidInternetMessageHeader".into(),
                            format!(
                                "The internet message header name '{name}' should start with 'x-' or 'X-'."
                            ),
                        ));
                    }
                    hs.push(MessageHeader::new(
                        name,
                        h["value"].as_str().unwrap_or("").to_string(),
                    ));
                }
                p.headers = Some(hs);
            }
            "attachments" => {
                for a in val.as_array().cloned().unwrap_or_default() {
                    p.attachments.push(parse_attachment(&a, st).map_err(bad)?);
                }
            }
            _ => {}
        }
    }
    Ok(p)
}

fn parse_attachment(a: &Value, st: &mut State) -> Result<Attachment, String> {
    let bytes = STANDARD
        .decode(a["contentBytes"].as_str().unwrap_or("").as_bytes())
        .map_err(|_| "contentBytes is not valid base64.".to_string())?;
    Ok(Attachment {
        id: format!("AAMkAGAtt{}=", st.rand_b64(30)),
        name: a["name"].as_str().unwrap_or("attachment").to_string(),
        content_type: a["contentType"]
            .as_str()
            .unwrap_or("application/octet-stream")
            .to_string(),
        bytes,
        is_inline: a["isInline"].as_bool().unwrap_or(false),
        content_id: a["contentId"].as_str().map(str::to_string),
        last_modified: st.now(),
    })
}

fn attachment_json(a: &Attachment, with_bytes: bool) -> Value {
    let mut v = json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "@odata.mediaContentType": a.content_type,
        "id": a.id,
        "lastModifiedDateTime": fmt_dt(a.last_modified),
        "name": a.name,
        "contentType": a.content_type,
        "size": a.bytes.len() + 180,
        "isInline": a.is_inline,
        "contentId": a.content_id,
        "contentLocation": null,
    });
    if with_bytes {
        v["contentBytes"] = json!(STANDARD.encode(&a.bytes));
    }
    v
}

/// Properties of Graph's base `attachment` type: `$select` on an attachments collection may
/// name these directly.
const ATTACHMENT_PROPS: &[&str] = &[
    "id",
    "lastModifiedDateTime",
    "name",
    "contentType",
    "size",
    "isInline",
];
/// Properties only `fileAttachment` has: `$select` reaches them through the OData type cast
/// (`microsoft.graph.fileAttachment/contentId`); named bare they make Graph refuse the request.
const FILE_ATTACHMENT_PROPS: &[&str] = &["contentId", "contentLocation", "contentBytes"];
const FILE_ATTACHMENT_CAST: &str = "microsoft.graph.fileAttachment/";

/// Parses `$select` for attachments into canonical property names.
fn parse_attachment_select(s: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (allowed, name, on_type): (&[&str], &str, &str) = match p
            .get(..FILE_ATTACHMENT_CAST.len())
            .filter(|head| head.eq_ignore_ascii_case(FILE_ATTACHMENT_CAST))
        {
            Some(_) => (
                FILE_ATTACHMENT_PROPS,
                &p[FILE_ATTACHMENT_CAST.len()..],
                "microsoft.graph.fileAttachment",
            ),
            None => (&[], p, "microsoft.graph.attachment"),
        };
        let canon = ATTACHMENT_PROPS
            .iter()
            .chain(allowed)
            .find(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!("Could not find a property named '{name}' on type '{on_type}'.")
            })?;
        out.push((*canon).to_string());
    }
    Ok(out)
}

/// An attachment as Graph returns it under `$select`: `@odata.type` and `id` always, then only
/// the selected properties. (Every simulator attachment is a file attachment, so the
/// fileAttachment properties apply to all of them.)
fn select_attachment(full: Value, select: Option<&[String]>) -> Value {
    let Some(select) = select else { return full };
    let Value::Object(all) = full else {
        return full;
    };
    let keep = |k: &str| k == "@odata.type" || k == "id" || select.iter().any(|s| s == k);
    Value::Object(all.into_iter().filter(|(k, _)| keep(k)).collect())
}

fn user_json(u: &SimUser, base: &str) -> Value {
    let (given, sur) = u
        .display_name
        .split_once(' ')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or((u.display_name.clone(), String::new()));
    json!({
        "@odata.context": format!("{base}/v1.0/$metadata#users/$entity"),
        "businessPhones": [],
        "displayName": u.display_name,
        "givenName": given,
        "jobTitle": null,
        "mail": u.mail,
        "mobilePhone": null,
        "officeLocation": null,
        "preferredLanguage": "en-US",
        "surname": sur,
        "userPrincipalName": u.upn,
        "id": u.id,
    })
}

fn not_found(ctx: &Ctx) -> SimResponse {
    ctx.error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

fn missing_message(ctx: &Ctx, id: &str) -> SimResponse {
    // Graph rejects strings that cannot be an EWS id before looking anything up.
    if id.len() < 20 || id.contains(' ') {
        ctx.error(400, "ErrorInvalidIdMalformed", "Id is malformed.")
    } else {
        not_found(ctx)
    }
}

fn folder_not_found(ctx: &Ctx) -> SimResponse {
    ctx.error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

enum ReplyKind {
    Reply,
    ReplyAll,
    Forward,
}

impl GraphSim {
    pub(crate) async fn graph_pipeline(&self, req: &SimRequest, ctx: &Ctx) -> Outcome {
        let segs = split_path(&req.path);
        let segs = &segs[1..];
        let method = req.method.as_str().to_string();
        let cls = match classify(&method, segs) {
            Ok(c) => c,
            Err(seg) => {
                return Outcome::new(
                    ctx.error(
                        400,
                        "BadRequest",
                        &format!("Resource not found for the segment '{seg}'."),
                    ),
                    format!("{method} (unknown)"),
                );
            }
        };
        let route = format!("{method} {}", cls.template);
        let grant = match self.authenticate(req, ctx) {
            Ok(g) => g,
            Err(r) => return Outcome::new(r, route),
        };
        let mut out = Outcome::new(SimResponse::empty(500), route);
        // Resolve the mailbox and check rights before throttling, as Graph does.
        let target = {
            let st = self.lock();
            let target = match &cls.target {
                Target::Me => Some(grant.user_id.clone()),
                Target::User(key) => match st.user_idx(key) {
                    Some(i) => Some(st.users[i].user.id.clone()),
                    None => {
                        out.resp = ctx.error(
                            404,
                            "ErrorInvalidUser",
                            &format!("The requested user '{key}' is invalid."),
                        );
                        return out;
                    }
                },
                Target::None => None,
            };
            if let Some(t) = &target {
                let rec = st.user_by_id(t).expect("resolved user");
                out.mailbox = Some(rec.user.upn.clone());
                // No Exchange Online mailbox behind the address: nothing to grant rights on.
                if cls.mailbox_scoped && rec.mailbox.no_cloud_mailbox {
                    out.resp = ctx.error(
                        404,
                        "MailboxNotEnabledForRESTAPI",
                        "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
                    );
                    return out;
                }
                let shared = *t != grant.user_id;
                let allowed = !shared
                    || rec.mailbox.delegates.contains(&grant.user_id)
                    || (cls.need == Need::Profile
                        && st
                            .user_by_id(&grant.user_id)
                            .is_some_and(|g| g.user.tenant_id == rec.user.tenant_id));
                if !allowed {
                    out.resp = ctx.error(
                        403,
                        "ErrorAccessDenied",
                        "Access is denied. Check credentials and try again.",
                    );
                    return out;
                }
                let need = if shared && cls.need == Need::Profile {
                    Need::Any
                } else {
                    cls.need
                };
                if st.cfg.enforce_scopes && !scope_ok(&grant.scopes, need, shared) {
                    out.resp = ctx.error(
                        403,
                        "ErrorAccessDenied",
                        "Access is denied. Check credentials and try again.",
                    );
                    return out;
                }
                // Full access lets a delegate read and draft, not send as the mailbox.
                if shared
                    && cls.need == Need::MailSend
                    && rec.mailbox.send_as_denied.contains(&grant.user_id)
                {
                    out.resp = ctx.error(
                        403,
                        "ErrorSendAsDenied",
                        "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
                    );
                    return out;
                }
            } else if st.cfg.enforce_scopes && !scope_ok(&grant.scopes, cls.need, false) {
                out.resp = ctx.error(
                    403,
                    "Authorization_RequestDenied",
                    "Insufficient privileges to complete the operation.",
                );
                return out;
            }
            target
        };
        let _guard = match (&target, cls.mailbox_scoped) {
            (Some(t), true) => {
                let upn = out.mailbox.clone().unwrap_or_default();
                match self.acquire(t, &upn, ctx) {
                    Ok(g) => {
                        if let Err(r) = self.spend_budget(t, ctx) {
                            out.resp = r;
                            return out;
                        }
                        Some(g)
                    }
                    Err(r) => {
                        out.resp = r;
                        return out;
                    }
                }
            }
            _ => None,
        };
        let fault_mailbox = target.clone().unwrap_or_else(|| grant.user_id.clone());
        if let Err(r) = self
            .apply_faults(req, ctx, Some(&fault_mailbox), false)
            .await
        {
            out.resp = r;
            return out;
        }
        let mut applied = vec![];
        let imm = req.immutable_ids();
        if imm {
            applied.push("IdType=ImmutableId".to_string());
        }
        let body_html = req.body_type_pref();
        if let Some(h) = body_html {
            applied.push(format!(
                "outlook.body-content-type=\"{}\"",
                if h { "html" } else { "text" }
            ));
        }
        let view = View {
            imm,
            body_html,
            base: req.base_url.clone(),
        };
        let mut resp = match cls.template.as_str() {
            "/$batch" => self.batch(req, ctx).await,
            t if t.starts_with("/subscriptions") => {
                self.subscription_route(req, ctx, &cls, &grant, &view).await
            }
            _ => {
                let uid = target.clone().unwrap_or_default();
                self.mail_route(req, ctx, &cls, &uid, &view, &mut applied)
            }
        };
        if !applied.is_empty() {
            resp.headers
                .push(("Preference-Applied".into(), applied.join(", ")));
        }
        out.resp = resp;
        out
    }

    fn mail_route(
        &self,
        req: &SimRequest,
        ctx: &Ctx,
        cls: &Classified,
        uid: &str,
        view: &View,
        applied: &mut Vec<String>,
    ) -> SimResponse {
        let method = req.method.as_str();
        let params = query_params(&req.query);
        let p0 = cls.params.first().cloned().unwrap_or_default();
        let t = cls
            .template
            .replace("/me/mailFolders/{id}/messages/{id}", "/me/messages/{id}");
        let mut st = self.lock();
        match (method, t.as_str()) {
            ("GET", "/users") => {
                let Some(me) = st.user_by_id(uid).or_else(|| st.users.first()) else {
                    return ctx.error(404, "ErrorInvalidUser", "No users.");
                };
                let tid = me.user.tenant_id.clone();
                let v: Vec<Value> = st
                    .users
                    .iter()
                    .filter(|u| u.user.tenant_id == tid)
                    .map(|u| {
                        let mut j = user_json(&u.user, &view.base);
                        j.as_object_mut().map(|o| o.remove("@odata.context"));
                        j
                    })
                    .collect();
                SimResponse::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#users", view.base), "value": v}),
                )
            }
            ("GET", "/me") => {
                let u = st.user_by_id(uid).expect("user").user.clone();
                let mut j = user_json(&u, &view.base);
                if let Some(sel) = qp(&params, "select") {
                    let keep: Vec<String> = sel.split(',').map(|s| s.trim().to_string()).collect();
                    if let Some(o) = j.as_object_mut() {
                        o.retain(|k, _| {
                            k == "@odata.context"
                                || k == "id"
                                || keep.iter().any(|s| s.eq_ignore_ascii_case(k))
                        });
                    }
                }
                SimResponse::json(200, j)
            }
            ("GET", "/me/mailFolders") | ("GET", "/me/mailFolders/{id}/childFolders") => {
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                let parent = if t == "/me/mailFolders" {
                    "msgfolderroot".to_string()
                } else {
                    p0.clone()
                };
                let Some(pid) = mb.folder_id(&parent) else {
                    return folder_not_found(ctx);
                };
                let hidden = qp(&params, "includeHiddenFolders").is_some_and(|v| v == "true");
                let all: Vec<Value> = mb
                    .folders
                    .iter()
                    .filter(|f| f.parent_id == pid && (hidden || !f.is_hidden))
                    .map(|f| folder_json(mb, f))
                    .collect();
                let top = match qp(&params, "top").map(str::parse::<usize>) {
                    None => st.cfg.default_page_size,
                    Some(Ok(n)) if (1..=1000).contains(&n) => n,
                    Some(_) => {
                        return ctx.error(400, "ErrorInvalidArgument", "Invalid $top value.");
                    }
                };
                let skip = qp(&params, "skip")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                page_response(
                    all,
                    skip,
                    top,
                    req,
                    &params,
                    format!("{}/v1.0/$metadata#users('{}')/mailFolders", view.base, uid),
                    None,
                )
            }
            ("POST", "/me/mailFolders") | ("POST", "/me/mailFolders/{id}/childFolders") => {
                let Ok(body) = req.json() else {
                    return bad_json(ctx);
                };
                let Some(name) = body["displayName"].as_str() else {
                    return ctx.error(400, "ErrorInvalidRequest", "displayName is required.");
                };
                let parent = if t == "/me/mailFolders" {
                    "msgfolderroot".to_string()
                } else {
                    p0.clone()
                };
                match st.create_folder(uid, &parent, name) {
                    Ok(Some(id)) => {
                        let mb = &st.user_by_id(uid).expect("user").mailbox;
                        let f = mb.folder(&id).expect("new folder");
                        SimResponse::json(201, folder_json(mb, f))
                    }
                    Ok(None) => ctx.error(
                        409,
                        "ErrorFolderExists",
                        "A folder with the specified name already exists.",
                    ),
                    Err(_) => folder_not_found(ctx),
                }
            }
            ("GET", "/me/mailFolders/{id}") => {
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                match mb.folder_id(&p0).and_then(|id| mb.folder(&id)) {
                    Some(f) => {
                        let mut j = folder_json(mb, f);
                        j["@odata.context"] = json!(format!(
                            "{}/v1.0/$metadata#users('{}')/mailFolders/$entity",
                            view.base, uid
                        ));
                        SimResponse::json(200, j)
                    }
                    None => folder_not_found(ctx),
                }
            }
            ("GET", "/me/mailFolders/{id}/messages") | ("GET", "/me/messages") => {
                let folder = if t == "/me/messages" {
                    None
                } else {
                    Some(p0.as_str())
                };
                list_messages(&st, ctx, req, &params, uid, folder, view)
            }
            ("GET", "/me/mailFolders/{id}/messages/delta") => {
                delta(&mut st, ctx, req, &params, uid, &p0, view, applied)
            }
            ("POST", "/me/messages") | ("POST", "/me/mailFolders/{id}/messages") => {
                let folder = if t == "/me/messages" {
                    "drafts".to_string()
                } else {
                    p0.clone()
                };
                create_draft(&mut st, ctx, req, uid, &folder, view)
            }
            ("GET", "/me/messages/{id}") => {
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                let Some(m) = mb.msg(&p0) else {
                    return missing_message(ctx, &p0);
                };
                let select = match qp(&params, "select").map(odata::parse_select) {
                    Some(Err(e)) => return ctx.error(400, "RequestBroker--ParseUri", &e),
                    Some(Ok(s)) => Some(s),
                    None => None,
                };
                let mut j = render_msg(m, select.as_deref(), view);
                j["@odata.context"] = json!(format!(
                    "{}/v1.0/$metadata#users('{}')/messages/$entity",
                    view.base, uid
                ));
                SimResponse::json(200, j)
            }
            ("PATCH", "/me/messages/{id}") => patch_message(&mut st, ctx, req, uid, &p0, view),
            ("DELETE", "/me/messages/{id}") => {
                if st.user_by_id(uid).expect("user").mailbox.msg(&p0).is_none() {
                    return missing_message(ctx, &p0);
                }
                let _ = st.delete_message(uid, &p0);
                SimResponse::empty(204)
            }
            ("GET", "/me/messages/{id}/$value") => {
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                let Some(m) = mb.msg(&p0) else {
                    return missing_message(ctx, &p0);
                };
                SimResponse::text(200, "message/rfc822", mime(m))
            }
            ("GET", "/me/messages/{id}/attachments") => {
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                let Some(m) = mb.msg(&p0) else {
                    return missing_message(ctx, &p0);
                };
                let select = match qp(&params, "select").map(parse_attachment_select) {
                    Some(Err(e)) => return ctx.error(400, "RequestBroker--ParseUri", &e),
                    Some(Ok(s)) => Some(s),
                    None => None,
                };
                let v: Vec<Value> = m
                    .attachments
                    .iter()
                    .map(|a| select_attachment(attachment_json(a, true), select.as_deref()))
                    .collect();
                SimResponse::json(
                    200,
                    json!({
                        "@odata.context": format!("{}/v1.0/$metadata#users('{}')/messages('{}')/attachments", view.base, uid, p0),
                        "value": v,
                    }),
                )
            }
            ("POST", "/me/messages/{id}/attachments") => {
                let Ok(body) = req.json() else {
                    return bad_json(ctx);
                };
                let att = match parse_attachment(&body, &mut st) {
                    Ok(a) => a,
                    Err(e) => return ctx.error(400, "ErrorInvalidRequest", &e),
                };
                let j = attachment_json(&att, true);
                let Some(m) = st.user_mut(uid).expect("user").mailbox.msg_mut(&p0) else {
                    return missing_message(ctx, &p0);
                };
                if !m.is_draft {
                    return ctx.error(
                        400,
                        "ErrorInvalidPropertyUpdateSentMessage",
                        "Update operation is invalid for property of a sent message.",
                    );
                }
                m.attachments.push(att);
                st.touch(uid, &p0, &["hasAttachments"]);
                SimResponse::json(201, j)
            }
            ("GET", "/me/messages/{id}/attachments/{id}") => {
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                let Some(m) = mb.msg(&p0) else {
                    return missing_message(ctx, &p0);
                };
                let select = match qp(&params, "select").map(parse_attachment_select) {
                    Some(Err(e)) => return ctx.error(400, "RequestBroker--ParseUri", &e),
                    Some(Ok(s)) => Some(s),
                    None => None,
                };
                let aid = cls.params.get(1).cloned().unwrap_or_default();
                match m.attachments.iter().find(|a| a.id == aid) {
                    Some(a) => SimResponse::json(
                        200,
                        select_attachment(attachment_json(a, true), select.as_deref()),
                    ),
                    None => not_found(ctx),
                }
            }
            ("POST", "/me/messages/{id}/move") | ("POST", "/me/messages/{id}/copy") => {
                let Ok(body) = req.json() else {
                    return bad_json(ctx);
                };
                let Some(dest) = body["destinationId"].as_str() else {
                    return ctx.error(400, "ErrorInvalidRequest", "destinationId is required.");
                };
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                if mb.msg(&p0).is_none() {
                    return missing_message(ctx, &p0);
                }
                if mb.folder_id(dest).is_none() {
                    return folder_not_found(ctx);
                }
                let new_ref = if t.ends_with("/copy") {
                    let m = mb.msg(&p0).expect("checked").clone();
                    let dest_id = mb.folder_id(dest).expect("checked");
                    let mut nm = NewMsg::empty(dest_id);
                    nm.subject = m.subject;
                    nm.body_html = m.body_html;
                    nm.body = m.body;
                    nm.from = m.from;
                    nm.to = m.to;
                    nm.cc = m.cc;
                    nm.internet_message_id = Some(m.internet_message_id);
                    nm.conversation_id = Some(m.conversation_id);
                    nm.received = Some(m.received);
                    nm.is_read = m.is_read;
                    nm.is_draft = m.is_draft;
                    nm.from_internet = m.from_internet;
                    nm.headers = m.headers;
                    nm.attachments = m.attachments;
                    match st.add_message(uid, nm) {
                        Ok((id, _)) => id,
                        Err(_) => return not_found(ctx),
                    }
                } else {
                    match st.move_message(uid, &p0, dest) {
                        Ok(r) => r.id,
                        Err(_) => return not_found(ctx),
                    }
                };
                let mb = &st.user_by_id(uid).expect("user").mailbox;
                let m = mb.msg(&new_ref).expect("moved");
                SimResponse::json(201, render_msg(m, None, view))
            }
            ("POST", "/me/messages/{id}/createReply")
            | ("POST", "/me/messages/{id}/createReplyAll")
            | ("POST", "/me/messages/{id}/createForward") => {
                let kind = if t.ends_with("ReplyAll") {
                    ReplyKind::ReplyAll
                } else if t.ends_with("Forward") {
                    ReplyKind::Forward
                } else {
                    ReplyKind::Reply
                };
                match create_reply(&mut st, ctx, req, uid, &p0, kind) {
                    Ok(draft_id) => {
                        let mb = &st.user_by_id(uid).expect("user").mailbox;
                        let m = mb.msg(&draft_id).expect("draft");
                        let mut j = render_msg(m, None, view);
                        j["@odata.context"] = json!(format!(
                            "{}/v1.0/$metadata#users('{}')/messages/$entity",
                            view.base, uid
                        ));
                        SimResponse::json(201, j)
                    }
                    Err(r) => r,
                }
            }
            ("POST", "/me/messages/{id}/reply")
            | ("POST", "/me/messages/{id}/replyAll")
            | ("POST", "/me/messages/{id}/forward") => {
                let (kind, name) = if t.ends_with("replyAll") {
                    (ReplyKind::ReplyAll, "replyAll")
                } else if t.ends_with("forward") {
                    (ReplyKind::Forward, "forward")
                } else {
                    (ReplyKind::Reply, "reply")
                };
                let draft = match create_reply(&mut st, ctx, req, uid, &p0, kind) {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                match send_draft(&mut st, ctx, req, uid, &draft, name) {
                    Ok(()) => SimResponse::empty(202),
                    Err(r) => {
                        let _ = st.delete_message(uid, &draft);
                        r
                    }
                }
            }
            ("POST", "/me/messages/{id}/send") => {
                if st.user_by_id(uid).expect("user").mailbox.msg(&p0).is_none() {
                    return missing_message(ctx, &p0);
                }
                match send_draft(&mut st, ctx, req, uid, &p0, "send") {
                    Ok(()) => SimResponse::empty(202),
                    Err(r) => r,
                }
            }
            ("POST", "/me/sendMail") => send_mail(&mut st, ctx, req, uid),
            _ => ctx.error(
                405,
                "Request_BadRequest",
                &format!("The HTTP method '{method}' is not allowed for this resource."),
            ),
        }
    }
}

fn bad_json(ctx: &Ctx) -> SimResponse {
    ctx.error(
        400,
        "RequestBodyRead",
        "Invalid JSON. A token was not recognized in the JSON content.",
    )
}

fn page_response(
    all: Vec<Value>,
    skip: usize,
    top: usize,
    req: &SimRequest,
    params: &[(String, String)],
    context: String,
    count: Option<usize>,
) -> SimResponse {
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip(skip).take(top).collect();
    let mut body = json!({"@odata.context": context});
    if let Some(c) = count {
        body["@odata.count"] = json!(c);
    }
    body["value"] = Value::Array(page);
    if skip + top < total {
        let next = with_param(params, "skip", (skip + top).to_string());
        let next = with_param(&next, "top", top.to_string());
        body["@odata.nextLink"] = json!(format!(
            "{}{}?{}",
            req.base_url,
            req.path,
            encode_query(&next)
        ));
    }
    SimResponse::json(200, body)
}

fn list_messages(
    st: &State,
    ctx: &Ctx,
    req: &SimRequest,
    params: &[(String, String)],
    uid: &str,
    folder: Option<&str>,
    view: &View,
) -> SimResponse {
    let mb = &st.user_by_id(uid).expect("user").mailbox;
    let folder_id = match folder {
        Some(f) => match mb.folder_id(f) {
            Some(id) => Some(id),
            None => return folder_not_found(ctx),
        },
        None => None,
    };
    let top = match qp(params, "top").map(str::parse::<usize>) {
        None => st.cfg.default_page_size,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return ctx.error(
                400,
                "ErrorInvalidArgument",
                "The value of $top must be between 1 and 1000.",
            );
        }
    };
    let skip = match qp(params, "skip").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return ctx.error(400, "ErrorInvalidArgument", "Invalid $skip value."),
    };
    let select = match qp(params, "select").map(odata::parse_select) {
        Some(Err(e)) => return ctx.error(400, "RequestBroker--ParseUri", &e),
        Some(Ok(s)) => Some(s),
        None => None,
    };
    let filter = match qp(params, "filter").map(odata::parse_filter) {
        Some(Err(e)) => return ctx.error(400, "BadRequest", &e),
        Some(Ok(f)) => Some(f),
        None => None,
    };
    let order = match qp(params, "orderby").map(odata::parse_orderby) {
        Some(Err(e)) => return ctx.error(400, "BadRequest", &e),
        Some(Ok(o)) => Some(o),
        None => None,
    };
    if let (Some((_, fprops)), Some(o)) = (&filter, &order)
        && !odata::efficient(fprops, o)
    {
        return ctx.error(
            400,
            "InefficientFilter",
            "The restriction or sort order is too complex for this operation.",
        );
    }
    let mut msgs: Vec<&Msg> = mb
        .msgs
        .values()
        .filter(|m| folder_id.as_ref().is_none_or(|f| &m.folder_id == f))
        .filter(|m| filter.as_ref().is_none_or(|(e, _)| odata::eval(e, m)))
        .collect();
    let order = order.unwrap_or_else(|| vec![("receivedDateTime".into(), true)]);
    msgs.sort_by(|a, b| odata::compare(a, b, &order).then(b.created.cmp(&a.created)));
    let count = qp(params, "count")
        .is_some_and(|c| c == "true")
        .then_some(msgs.len());
    let all: Vec<Value> = msgs
        .iter()
        .map(|m| render_msg(m, select.as_deref(), view))
        .collect();
    let ctx_path = match folder {
        Some(f) => format!("mailFolders('{f}')/messages"),
        None => "messages".into(),
    };
    page_response(
        all,
        skip,
        top,
        req,
        params,
        format!("{}/v1.0/$metadata#users('{}')/{}", view.base, uid, ctx_path),
        count,
    )
}

#[allow(clippy::too_many_arguments)]
fn delta(
    st: &mut State,
    ctx: &Ctx,
    req: &SimRequest,
    params: &[(String, String)],
    uid: &str,
    folder_key: &str,
    view: &View,
    applied: &mut Vec<String>,
) -> SimResponse {
    let replay = st
        .take_faults(
            Phase::Delta,
            req.method.as_str(),
            &req.path_and_query(),
            Some(uid),
        )
        .iter()
        .any(|f| matches!(f, FaultKind::ReplayDeltaItems));
    let kept = st.cfg.delta_generations_kept.max(1);
    let default_page = st.cfg.default_page_size;
    let new_round_id = st.rand_b64(24);
    let new_delta_token = st.rand_b64(48);
    let pref_page = req.max_page_size();
    let mb = &mut st.user_mut(uid).expect("user").mailbox;
    let Some(folder_id) = mb.folder_id(folder_key) else {
        return folder_not_found(ctx);
    };
    let current = |mb: &Mailbox,
                   opts: &DeltaOpts|
     -> Vec<(String, SnapEntry, chrono::DateTime<chrono::Utc>)> {
        let mut v: Vec<_> = mb
            .in_folder(&folder_id)
            .filter(|m| opts.received_ge.is_none_or(|d| m.received >= d))
            .map(|m| {
                (
                    m.immutable_id.clone(),
                    SnapEntry {
                        plain_id: m.id.clone(),
                        version: m.version,
                    },
                    m.received,
                )
            })
            .collect();
        v.sort_by(|a, b| {
            if opts.order_desc {
                b.2.cmp(&a.2)
            } else {
                a.2.cmp(&b.2)
            }
        });
        if opts.received_ge.is_some() {
            v.truncate(5000);
        }
        v
    };
    let (round_id, page) = if let Some(skip) = qp(params, "skiptoken") {
        let Some((rid, pg)) = skip.rsplit_once('_') else {
            return sync_state_not_found(ctx);
        };
        let Ok(pg) = pg.parse::<usize>() else {
            return sync_state_not_found(ctx);
        };
        let fd = mb.delta.entry(folder_id.clone()).or_default();
        match fd.rounds.get_mut(rid) {
            Some(r) if pg >= r.highest_page => {
                r.highest_page = pg;
                (rid.to_string(), pg)
            }
            _ => return sync_state_not_found(ctx),
        }
    } else {
        let (opts, entries, next) = if let Some(tok) = qp(params, "deltatoken") {
            let fd = mb.delta.entry(folder_id.clone()).or_default();
            let Some(state) = fd.states.get(tok).cloned() else {
                return sync_state_not_found(ctx);
            };
            let cur = current(mb, &state.opts);
            let mut entries = vec![];
            for (imm, e, _) in &cur {
                match state.snapshot.get(imm) {
                    None => entries.push(DeltaEntry::Created(imm.clone())),
                    Some(old) if old.version < e.version => entries.push(DeltaEntry::Updated {
                        immutable: imm.clone(),
                        since: old.version,
                    }),
                    Some(_) => {}
                }
            }
            let cur_ids: std::collections::HashSet<&String> = cur.iter().map(|c| &c.0).collect();
            let mut removed: Vec<_> = state
                .snapshot
                .iter()
                .filter(|(imm, _)| !cur_ids.contains(imm))
                .collect();
            removed.sort_by(|a, b| a.0.cmp(b.0));
            for (imm, old) in removed {
                let reason = if mb.msg(imm).is_some() {
                    "changed"
                } else {
                    "deleted"
                };
                entries.push(DeltaEntry::Removed {
                    plain_id: old.plain_id.clone(),
                    immutable: imm.clone(),
                    reason,
                });
            }
            let next = cur.into_iter().map(|(i, e, _)| (i, e)).collect();
            (state.opts, entries, next)
        } else {
            let select = match qp(params, "select").map(odata::parse_select) {
                Some(Err(e)) => return ctx.error(400, "RequestBroker--ParseUri", &e),
                Some(Ok(s)) => Some(s),
                None => None,
            };
            let mut received_ge = None;
            if let Some(f) = qp(params, "filter") {
                match odata::parse_filter(f) {
                    Ok((
                        odata::Expr::Cmp {
                            prop,
                            op,
                            lit: odata::Lit::Date(d),
                        },
                        _,
                    )) if prop == "receivedDateTime"
                        && matches!(op, odata::Op::Ge | odata::Op::Gt) =>
                    {
                        received_ge = Some(d)
                    }
                    Ok(_) => {
                        return ctx.error(
                            400,
                            "ErrorInvalidUrlQueryFilter",
                            "Delta query supports only $filter=receivedDateTime ge {value}.",
                        );
                    }
                    Err(e) => return ctx.error(400, "BadRequest", &e),
                }
            }
            let order_desc = match qp(params, "orderby") {
                None => true,
                Some(o) => match odata::parse_orderby(o) {
                    Ok(v) if v.len() == 1 && v[0].0 == "receivedDateTime" => v[0].1,
                    _ => {
                        return ctx.error(
                            400,
                            "ErrorInvalidUrlQuery",
                            "Delta query supports only $orderby=receivedDateTime desc.",
                        );
                    }
                },
            };
            let opts = DeltaOpts {
                select,
                received_ge,
                order_desc,
            };
            let cur = current(mb, &opts);
            let entries = cur
                .iter()
                .map(|(i, _, _)| DeltaEntry::Created(i.clone()))
                .collect();
            let next = cur.into_iter().map(|(i, e, _)| (i, e)).collect();
            (opts, entries, next)
        };
        let page_size = pref_page
            .or_else(|| qp(params, "top").and_then(|t| t.parse().ok()))
            .unwrap_or(default_page)
            .clamp(1, 1000);
        let fd = mb.delta.entry(folder_id.clone()).or_default();
        fd.rounds.insert(
            new_round_id.clone(),
            Round {
                entries,
                next_snapshot: next,
                opts,
                page_size,
                highest_page: 0,
                delta_token: None,
            },
        );
        fd.round_order.push_back(new_round_id.clone());
        while fd.round_order.len() > 4 * kept + 4 {
            if let Some(old) = fd.round_order.pop_front() {
                fd.rounds.remove(&old);
            }
        }
        (new_round_id, 0)
    };
    // Render the page from the current state of the mailbox.
    let (slice, more, page_size, opts) = {
        let fd = mb.delta.get(&folder_id).expect("delta state");
        let r = fd.rounds.get(&round_id).expect("round");
        let start = page * r.page_size;
        let end = (start + r.page_size).min(r.entries.len());
        let slice: Vec<DeltaEntry> = r
            .entries
            .get(start..end)
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        (slice, end < r.entries.len(), r.page_size, r.opts.clone())
    };
    let mut value = vec![];
    for e in &slice {
        match e {
            DeltaEntry::Created(imm) => {
                if let Some(m) = mb.msg(imm).filter(|m| m.folder_id == folder_id) {
                    value.push(render_msg(m, opts.select.as_deref(), view));
                }
            }
            DeltaEntry::Updated { immutable, since } => {
                if let Some(m) = mb.msg(immutable).filter(|m| m.folder_id == folder_id) {
                    let mut o = Map::new();
                    o.insert("@odata.type".into(), json!("#microsoft.graph.message"));
                    o.insert(
                        "@odata.etag".into(),
                        json!(format!("W/\"{}\"", m.change_key)),
                    );
                    o.insert("id".into(), json!(m.out_id(view.imm)));
                    for (f, v) in &m.field_versions {
                        if *v > *since
                            && opts
                                .select
                                .as_ref()
                                .is_none_or(|s| s.iter().any(|x| x == f))
                            && let Some(val) = prop_value(m, f, view)
                        {
                            o.insert((*f).to_string(), val);
                        }
                    }
                    for f in ["lastModifiedDateTime", "changeKey"] {
                        if let Some(val) = prop_value(m, f, view) {
                            o.insert(f.into(), val);
                        }
                    }
                    value.push(Value::Object(o));
                }
            }
            DeltaEntry::Removed {
                plain_id,
                immutable,
                reason,
            } => value.push(json!({
                "@odata.type": "#microsoft.graph.message",
                "id": if view.imm { immutable } else { plain_id },
                "@removed": {"reason": reason},
            })),
        }
    }
    if replay {
        value.extend(value.clone());
    }
    if pref_page.is_some() {
        applied.push(format!("odata.maxpagesize={page_size}"));
    }
    let link_base = format!("{}{}", req.base_url, req.path);
    let mut body = json!({
        "@odata.context": format!("{}/v1.0/$metadata#Collection(message)", view.base),
        "value": value,
    });
    if more {
        body["@odata.nextLink"] = json!(format!("{link_base}?$skiptoken={round_id}_{}", page + 1));
    } else {
        let fd = mb.delta.get_mut(&folder_id).expect("delta state");
        let r = fd.rounds.get_mut(&round_id).expect("round");
        let tok = match &r.delta_token {
            Some(t) => t.clone(),
            None => {
                r.delta_token = Some(new_delta_token.clone());
                let state = SyncState {
                    snapshot: r.next_snapshot.clone(),
                    opts: r.opts.clone(),
                };
                fd.states.insert(new_delta_token.clone(), state);
                fd.generations.push_back(new_delta_token.clone());
                while fd.generations.len() > kept {
                    if let Some(old) = fd.generations.pop_front() {
                        fd.states.remove(&old);
                    }
                }
                new_delta_token
            }
        };
        body["@odata.deltaLink"] = json!(format!("{link_base}?$deltatoken={tok}"));
    }
    SimResponse::json(200, body)
}

fn owner_addr(st: &State, uid: &str) -> EmailAddress {
    let u = &st.user_by_id(uid).expect("user").user;
    EmailAddress::new(
        u.display_name.clone(),
        u.mail.clone().unwrap_or(u.upn.clone()),
    )
}

fn create_draft(
    st: &mut State,
    ctx: &Ctx,
    req: &SimRequest,
    uid: &str,
    folder: &str,
    view: &View,
) -> SimResponse {
    let Ok(body) = req.json() else {
        return bad_json(ctx);
    };
    let patch = match parse_patch(&body, st) {
        Ok(p) => p,
        Err((c, m)) => return ctx.error(400, &c, &m),
    };
    let Some(fid) = st.user_by_id(uid).expect("user").mailbox.folder_id(folder) else {
        return folder_not_found(ctx);
    };
    let mut nm = NewMsg::empty(fid);
    nm.is_draft = true;
    nm.from = Some(owner_addr(st, uid));
    apply_patch_new(&mut nm, patch);
    match st.add_message(uid, nm) {
        Ok((id, _)) => {
            let m = st
                .user_by_id(uid)
                .expect("user")
                .mailbox
                .msg(&id)
                .expect("new");
            SimResponse::json(201, render_msg(m, None, view))
        }
        Err(_) => folder_not_found(ctx),
    }
}

fn apply_patch_new(nm: &mut NewMsg, p: MsgPatch) {
    if let Some(s) = p.subject {
        nm.subject = s;
    }
    if let Some((h, c)) = p.body {
        nm.body_html = h;
        nm.body = c;
    }
    if let Some(v) = p.to {
        nm.to = v;
    }
    if let Some(v) = p.cc {
        nm.cc = v;
    }
    if let Some(v) = p.bcc {
        nm.bcc = v;
    }
    if let Some(v) = p.reply_to {
        nm.reply_to = v;
    }
    if let Some(v) = p.headers {
        nm.extra_headers = v;
    }
    nm.attachments.extend(p.attachments);
}

fn patch_message(
    st: &mut State,
    ctx: &Ctx,
    req: &SimRequest,
    uid: &str,
    id: &str,
    view: &View,
) -> SimResponse {
    let Ok(body) = req.json() else {
        return bad_json(ctx);
    };
    let patch = match parse_patch(&body, st) {
        Ok(p) => p,
        Err((c, m)) => return ctx.error(400, &c, &m),
    };
    let Some(m) = st.user_mut(uid).expect("user").mailbox.msg_mut(id) else {
        return missing_message(ctx, id);
    };
    let draft_only = patch.subject.is_some()
        || patch.body.is_some()
        || patch.to.is_some()
        || patch.cc.is_some()
        || patch.bcc.is_some()
        || patch.headers.is_some();
    if draft_only && !m.is_draft {
        return ctx.error(
            400,
            "ErrorInvalidPropertyUpdateSentMessage",
            "Update operation is invalid for property of a sent message.",
        );
    }
    let mut fields: Vec<&'static str> = vec![];
    if let Some(s) = patch.subject {
        m.subject = s;
        fields.push("subject");
    }
    if let Some((h, c)) = patch.body {
        m.body_html = h;
        m.body = c;
        fields.extend(["body", "bodyPreview"]);
    }
    if let Some(v) = patch.to {
        m.to = v;
        fields.push("toRecipients");
    }
    if let Some(v) = patch.cc {
        m.cc = v;
        fields.push("ccRecipients");
    }
    if let Some(v) = patch.bcc {
        m.bcc = v;
        fields.push("bccRecipients");
    }
    if let Some(v) = patch.reply_to {
        m.reply_to = v;
        fields.push("replyTo");
    }
    if let Some(v) = patch.importance {
        m.importance = v;
        fields.push("importance");
    }
    if let Some(v) = patch.is_read {
        m.is_read = v;
        fields.push("isRead");
    }
    if let Some(v) = patch.headers {
        m.extra_headers = v;
    }
    st.touch(uid, id, &fields);
    let m = st
        .user_by_id(uid)
        .expect("user")
        .mailbox
        .msg(id)
        .expect("patched");
    SimResponse::json(200, render_msg(m, None, view))
}

fn quote_block(m: &Msg) -> String {
    let from = m
        .from
        .as_ref()
        .map(|a| format!("{} &lt;{}&gt;", a.name, a.address))
        .unwrap_or_default();
    let body = if m.body_html {
        m.body.clone()
    } else {
        text_to_html(&m.body)
    };
    format!(
        "<hr style=\"display:inline-block;width:98%\" tabindex=\"-1\"><div id=\"divRplyFwdMsg\" dir=\"ltr\"><font face=\"Calibri, sans-serif\" style=\"font-size:11pt\" color=\"#000000\"><b>From:</b> {from}<br><b>Sent:</b> {}<br><b>Subject:</b> {}</font><div>&nbsp;</div></div>{body}",
        m.sent.unwrap_or(m.received).to_rfc2822(),
        m.subject
    )
}

fn create_reply(
    st: &mut State,
    ctx: &Ctx,
    req: &SimRequest,
    uid: &str,
    id: &str,
    kind: ReplyKind,
) -> Result<String, SimResponse> {
    let Ok(body) = req.json() else {
        return Err(bad_json(ctx));
    };
    let comment = body
        .get("comment")
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = body.get("message").filter(|m| !m.is_null()).cloned();
    if comment.is_some() && message.is_some() {
        return Err(ctx.error(
            400,
            "ErrorInvalidRequest",
            "The 'comment' and 'message' parameters cannot both be specified.",
        ));
    }
    let patch = match &message {
        Some(m) => parse_patch(m, st).map_err(|(c, m)| ctx.error(400, &c, &m))?,
        None => MsgPatch::default(),
    };
    let me = owner_addr(st, uid);
    let mut tail = [0u8; 5];
    rand::RngCore::fill_bytes(&mut st.rng, &mut tail);
    let mb = &st.user_by_id(uid).expect("user").mailbox;
    let Some(orig) = mb.msg(id).cloned() else {
        return Err(missing_message(ctx, id));
    };
    let drafts = mb.well_known_id("drafts");
    let not_me = |a: &EmailAddress| !a.address.eq_ignore_ascii_case(&me.address);
    let (prefix, to, cc) = match kind {
        ReplyKind::Reply | ReplyKind::ReplyAll => {
            let mut to: Vec<EmailAddress> = if orig.reply_to.is_empty() {
                orig.from.clone().into_iter().collect()
            } else {
                orig.reply_to.clone()
            };
            let mut cc = vec![];
            if matches!(kind, ReplyKind::ReplyAll) {
                to.extend(orig.to.iter().filter(|a| not_me(a)).cloned());
                cc = orig.cc.iter().filter(|a| not_me(a)).cloned().collect();
            }
            ("RE: ", to, cc)
        }
        ReplyKind::Forward => ("FW: ", vec![], vec![]),
    };
    let mut subject_base = orig.subject.trim_start();
    loop {
        let l = subject_base.to_ascii_lowercase();
        let p = prefix.trim().to_ascii_lowercase();
        if l.starts_with(&p) {
            subject_base = subject_base[p.len()..].trim_start();
        } else {
            break;
        }
    }
    let lead = match (&comment, &patch.body) {
        (_, Some((true, c))) => c.clone(),
        (_, Some((false, c))) => text_to_html(c),
        (Some(c), None) => text_to_html(c),
        (None, None) => String::new(),
    };
    let mut conv_index = orig.conversation_index.clone();
    conv_index.extend_from_slice(&tail);
    let mut references = orig.references.clone();
    references.push(orig.internet_message_id.clone());
    let mut nm = NewMsg::empty(drafts);
    nm.subject = format!("{prefix}{subject_base}");
    nm.body_html = true;
    nm.body = format!(
        "<html><head>\r\n<meta http-equiv=\"Content-Type\" content=\"text/html; charset=utf-8\"></head><body>{lead}{}</body></html>",
        quote_block(&orig)
    );
    nm.from = Some(me);
    nm.to = to;
    nm.cc = cc;
    nm.conversation_id = Some(orig.conversation_id.clone());
    nm.conversation_index = Some(conv_index);
    nm.is_draft = true;
    nm.references = references;
    if !matches!(kind, ReplyKind::Forward) {
        nm.in_reply_to = Some(orig.internet_message_id.clone());
    } else {
        nm.attachments = orig.attachments.clone();
    }
    let body_override = patch.body.is_some();
    let mut patch = patch;
    patch.body = None;
    apply_patch_new(&mut nm, patch);
    let _ = body_override;
    st.add_message(uid, nm)
        .map(|(id, _)| id)
        .map_err(|_| not_found(ctx))
}

fn validate_recipients(ctx: &Ctx, m: &Msg) -> Result<(), SimResponse> {
    let all: Vec<&EmailAddress> = m.to.iter().chain(&m.cc).chain(&m.bcc).collect();
    if all.is_empty() {
        return Err(ctx.error(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
        ));
    }
    if let Some(bad) = all.iter().find(|a| {
        let parts: Vec<&str> = a.address.split('@').collect();
        parts.len() != 2 || parts[0].is_empty() || !parts[1].contains('.')
    }) {
        return Err(ctx.error(
            400,
            "ErrorInvalidRecipients",
            &format!("At least one recipient isn't valid., Recipient '{}' is not resolved. All recipients must be resolved before a message can be submitted.", bad.address),
        ));
    }
    Ok(())
}

/// Transport: removes the draft, records the send, schedules the Sent Items copy, and delivers
/// to recipients that live in the simulator.
fn transport(
    st: &mut State,
    req: &SimRequest,
    uid: &str,
    mut m: Msg,
    kind: &str,
    draft: Option<(String, String)>,
    save: bool,
) {
    let now = st.now();
    let faults = st.take_faults(
        Phase::Send,
        req.method.as_str(),
        &req.path_and_query(),
        Some(uid),
    );
    let extra: u64 = faults
        .iter()
        .map(|f| match f {
            FaultKind::SentItemsDelay { millis } => *millis,
            _ => 0,
        })
        .sum();
    let delay = Duration::milliseconds((st.cfg.sent_items_delay_ms + extra) as i64);
    let new_id = format!("AAMkAG{}AAA=", st.rand_b64(96));
    let ck = st.new_change_key();
    let user = st.user_by_id(uid).expect("user").user.clone();
    let sent_folder = st
        .user_by_id(uid)
        .expect("user")
        .mailbox
        .well_known_id("sentitems");
    m.id = new_id;
    m.folder_id = sent_folder;
    m.is_draft = false;
    m.is_read = true;
    m.sent = Some(now);
    m.received = now;
    m.last_modified = now;
    m.change_key = ck;
    m.from_internet = false;
    m.headers.clear();
    m.field_versions.clear();
    let visible = now + delay;
    st.sends.push(SentRecord {
        user_id: uid.to_string(),
        user_upn: user.upn.clone(),
        kind: kind.to_string(),
        draft_id: draft.as_ref().map(|d| d.0.clone()),
        draft_immutable_id: draft.as_ref().map(|d| d.1.clone()),
        internet_message_id: m.internet_message_id.clone(),
        conversation_id: m.conversation_id.clone(),
        subject: m.subject.clone(),
        to: m.to.iter().map(|a| a.address.clone()).collect(),
        cc: m.cc.iter().map(|a| a.address.clone()).collect(),
        bcc: m.bcc.iter().map(|a| a.address.clone()).collect(),
        in_reply_to: m.in_reply_to.clone(),
        references: m.references.clone(),
        body: m.body.clone(),
        sent_message_id: save.then(|| m.id.clone()),
        sent_immutable_id: save.then(|| m.immutable_id.clone()),
        sent_at: now,
        sent_items_visible_at: save.then_some(visible),
    });
    // Recipients hosted by the simulator receive the message as internet mail.
    let recipients: Vec<EmailAddress> = m.to.iter().chain(&m.cc).chain(&m.bcc).cloned().collect();
    let mut seen = std::collections::HashSet::new();
    for r in recipients {
        let key = r.address.to_ascii_lowercase();
        if !seen.insert(key.clone()) || key == user.upn.to_ascii_lowercase() {
            continue;
        }
        if st.user_idx(&key).is_some() {
            let mail = InboundMail {
                from: EmailAddress::new(
                    user.display_name.clone(),
                    user.mail.clone().unwrap_or(user.upn.clone()),
                ),
                to: m.to.clone(),
                cc: m.cc.clone(),
                subject: m.subject.clone(),
                html_body: m.body_html.then(|| m.body.clone()),
                text_body: (!m.body_html).then(|| m.body.clone()),
                message_id: Some(m.internet_message_id.clone()),
                in_reply_to: m.in_reply_to.clone(),
                references: m.references.clone(),
                headers: m.extra_headers.clone(),
                received: Some(now),
                ..InboundMail::default()
            };
            let _ = st.deliver(&key, mail);
        }
    }
    if save {
        st.pending_sent.push(PendingSent {
            due: visible,
            user_id: uid.to_string(),
            msg: m,
        });
        st.materialize_pending();
    }
}

fn blank_msg() -> Msg {
    Msg {
        id: String::new(),
        immutable_id: String::new(),
        folder_id: String::new(),
        internet_message_id: String::new(),
        conversation_id: String::new(),
        conversation_index: vec![],
        subject: String::new(),
        body_html: false,
        body: String::new(),
        from: None,
        sender: None,
        to: vec![],
        cc: vec![],
        bcc: vec![],
        reply_to: vec![],
        received: chrono::Utc::now(),
        sent: None,
        created: chrono::Utc::now(),
        last_modified: chrono::Utc::now(),
        is_read: false,
        is_draft: false,
        change_key: String::new(),
        headers: vec![],
        from_internet: false,
        in_reply_to: None,
        references: vec![],
        extra_headers: vec![],
        attachments: vec![],
        importance: String::new(),
        version: 0,
        field_versions: HashMap::new(),
    }
}

fn send_draft(
    st: &mut State,
    ctx: &Ctx,
    req: &SimRequest,
    uid: &str,
    id: &str,
    kind: &str,
) -> Result<(), SimResponse> {
    let mb = &st.user_by_id(uid).expect("user").mailbox;
    let Some(m) = mb.msg(id).cloned() else {
        return Err(missing_message(ctx, id));
    };
    if !m.is_draft {
        return Err(ctx.error(
            400,
            "ErrorInvalidRequest",
            "Only a draft message can be sent.",
        ));
    }
    validate_recipients(ctx, &m)?;
    let draft_ids = (m.id.clone(), m.immutable_id.clone());
    let _ = st.delete_message(uid, id);
    transport(st, req, uid, m, kind, Some(draft_ids), true);
    Ok(())
}

fn send_mail(st: &mut State, ctx: &Ctx, req: &SimRequest, uid: &str) -> SimResponse {
    let Ok(body) = req.json() else {
        return bad_json(ctx);
    };
    let Some(message) = body.get("message") else {
        return ctx.error(
            400,
            "ErrorInvalidRequest",
            "The request body must contain the 'message' parameter.",
        );
    };
    let save = body
        .get("saveToSentItems")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let patch = match parse_patch(message, st) {
        Ok(p) => p,
        Err((c, m)) => return ctx.error(400, &c, &m),
    };
    let imid = st.new_internet_message_id();
    let conv = format!("AAQkAG{}=", st.rand_b64(45));
    let imm = format!("AAkALg{}AAA=", st.rand_b64(96));
    let mut idx = vec![1u8; 22];
    rand::RngCore::fill_bytes(&mut st.rng, &mut idx[1..]);
    let now = st.now();
    let mut nm = NewMsg::empty(String::new());
    nm.from = Some(owner_addr(st, uid));
    apply_patch_new(&mut nm, patch);
    let mut m = blank_msg();
    m.immutable_id = imm;
    m.internet_message_id = imid;
    m.conversation_id = conv;
    m.conversation_index = idx;
    m.subject = nm.subject;
    m.body_html = nm.body_html;
    m.body = nm.body;
    m.sender = nm.from.clone();
    m.from = nm.from;
    m.to = nm.to;
    m.cc = nm.cc;
    m.bcc = nm.bcc;
    m.reply_to = nm.reply_to;
    m.extra_headers = nm.extra_headers;
    m.attachments = nm.attachments;
    m.created = now;
    m.importance = "normal".into();
    if let Err(r) = validate_recipients(ctx, &m) {
        return r;
    }
    transport(st, req, uid, m, "sendMail", None, save);
    SimResponse::empty(202)
}

fn mime(m: &Msg) -> String {
    let mut out = String::new();
    let fmt = |a: &EmailAddress| {
        if a.name.is_empty() {
            a.address.clone()
        } else {
            format!("\"{}\" <{}>", a.name, a.address)
        }
    };
    let headers: Vec<MessageHeader> = if m.from_internet {
        m.headers
            .iter()
            .filter(|h| {
                !h.name.eq_ignore_ascii_case("content-type")
                    && !h.name.eq_ignore_ascii_case("mime-version")
            })
            .cloned()
            .collect()
    } else {
        let mut h = vec![];
        if let Some(f) = &m.from {
            h.push(MessageHeader::new("From", fmt(f)));
        }
        h.push(MessageHeader::new(
            "To",
            m.to.iter().map(fmt).collect::<Vec<_>>().join(", "),
        ));
        h.push(MessageHeader::new("Subject", m.subject.clone()));
        h.push(MessageHeader::new(
            "Date",
            m.sent.unwrap_or(m.received).to_rfc2822(),
        ));
        h.push(MessageHeader::new(
            "Message-ID",
            m.internet_message_id.clone(),
        ));
        if let Some(i) = &m.in_reply_to {
            h.push(MessageHeader::new("In-Reply-To", i.clone()));
        }
        if !m.references.is_empty() {
            h.push(MessageHeader::new("References", m.references.join(" ")));
        }
        h.extend(m.extra_headers.iter().cloned());
        h
    };
    for h in &headers {
        out.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    out.push_str("MIME-Version: 1.0\r\n");
    let ct = if m.body_html {
        "text/html"
    } else {
        "text/plain"
    };
    if m.attachments.is_empty() {
        out.push_str(&format!(
            "Content-Type: {ct}; charset=\"utf-8\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n",
            m.body
        ));
        return out;
    }
    let boundary = "_000_graphsim_boundary_";
    out.push_str(&format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: {ct}; charset=\"utf-8\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n",
        m.body
    ));
    for a in &m.attachments {
        let b64 = STANDARD.encode(&a.bytes);
        out.push_str(&format!(
            "--{boundary}\r\nContent-Type: {}; name=\"{}\"\r\nContent-Disposition: {}; filename=\"{}\"\r\nContent-Transfer-Encoding: base64\r\n",
            a.content_type,
            a.name,
            if a.is_inline { "inline" } else { "attachment" },
            a.name
        ));
        if let Some(cid) = &a.content_id {
            out.push_str(&format!("Content-ID: <{cid}>\r\n"));
        }
        out.push_str("\r\n");
        for chunk in b64.as_bytes().chunks(76) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or(""));
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    out
}

impl GraphSim {
    async fn batch(&self, req: &SimRequest, ctx: &Ctx) -> SimResponse {
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            return ctx.error(400, "BadRequest", "Invalid batch payload format.");
        };
        let Some(reqs) = body["requests"].as_array().cloned() else {
            return ctx.error(400, "BadRequest", "Invalid batch payload format.");
        };
        if reqs.is_empty() {
            return ctx.error(400, "BadRequest", "Invalid batch payload format.");
        }
        if reqs.len() > 20 {
            return ctx.error(
                400,
                "BadRequest",
                "The number of batch requests exceeds the limit of 20.",
            );
        }
        let mut ids: Vec<String> = vec![];
        for r in &reqs {
            let id = match &r["id"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return ctx.error(400, "BadRequest", "Each batch request must have an id."),
            };
            if ids.contains(&id) {
                return ctx.error(
                    400,
                    "BadRequest",
                    &format!("Batch request ids must be unique; '{id}' is repeated."),
                );
            }
            ids.push(id);
            let has_body = r.get("body").is_some_and(|b| !b.is_null());
            let has_ct = r["headers"]
                .as_object()
                .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("content-type")));
            if has_body && !has_ct {
                return ctx.error(
                    400,
                    "BadRequest",
                    &format!(
                        "Write request id : {} does not contain Content-Type header or body.",
                        ids.last().expect("pushed")
                    ),
                );
            }
            if r["method"].as_str().is_none() || r["url"].as_str().is_none() {
                return ctx.error(
                    400,
                    "BadRequest",
                    "Each batch request needs method and url.",
                );
            }
        }
        let deps: Vec<Vec<String>> = reqs
            .iter()
            .map(|r| match &r["dependsOn"] {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect(),
                _ => vec![],
            })
            .collect();
        for d in deps.iter().flatten() {
            if !ids.contains(d) {
                return ctx.error(
                    400,
                    "BadRequest",
                    &format!("dependsOn refers to an unknown request id '{d}'."),
                );
            }
        }
        let mut status: HashMap<String, u16> = HashMap::new();
        let mut responses = vec![];
        let mut done = vec![false; reqs.len()];
        while done.iter().any(|d| !d) {
            let Some(i) = (0..reqs.len())
                .find(|i| !done[*i] && deps[*i].iter().all(|d| status.contains_key(d)))
            else {
                return ctx.error(400, "BadRequest", "dependsOn forms a cycle.");
            };
            done[i] = true;
            let r = &reqs[i];
            let id = ids[i].clone();
            if let Some(failed) = deps[i].iter().find(|d| !(200..300).contains(&status[*d])) {
                status.insert(id.clone(), 424);
                responses.push(json!({
                    "id": id, "status": 424, "headers": {},
                    "body": {"error": {"code": "FailedDependency", "message": format!("The request depends on request '{failed}', which failed."),
                        "innerError": {"date": ctx.now.format("%Y-%m-%dT%H:%M:%S").to_string(), "request-id": ctx.request_id, "client-request-id": ctx.request_id}}}
                }));
                continue;
            }
            let url = r["url"].as_str().unwrap_or("");
            let url = if url.starts_with('/') {
                url.to_string()
            } else {
                format!("/{url}")
            };
            let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
            let mut headers = poem::http::HeaderMap::new();
            if let Some(a) = req.headers.get("authorization") {
                headers.insert("authorization", a.clone());
            }
            let mut is_json = true;
            if let Some(h) = r["headers"].as_object() {
                for (k, v) in h {
                    if let (Ok(name), Some(Ok(val))) = (
                        poem::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
                        v.as_str().map(poem::http::HeaderValue::from_str),
                    ) {
                        if k.eq_ignore_ascii_case("content-type") {
                            is_json = v.as_str().unwrap_or("").contains("json");
                        }
                        headers.append(name, val);
                    }
                }
            }
            let body = match r.get("body") {
                None | Some(Value::Null) => vec![],
                Some(Value::String(s)) if !is_json => s.as_bytes().to_vec(),
                Some(v) => serde_json::to_vec(v).unwrap_or_default(),
            };
            let inner = SimRequest {
                method: poem::http::Method::from_bytes(
                    r["method"]
                        .as_str()
                        .unwrap_or("GET")
                        .to_ascii_uppercase()
                        .as_bytes(),
                )
                .unwrap_or(poem::http::Method::GET),
                path: format!("/v1.0{path}"),
                query: query.to_string(),
                headers,
                body,
                base_url: req.base_url.clone(),
                in_batch: true,
            };
            let resp = self.handle(inner).await;
            status.insert(id.clone(), resp.status);
            let mut h = Map::new();
            for (k, v) in &resp.headers {
                h.insert(k.clone(), json!(v));
            }
            let mut item = json!({"id": id, "status": resp.status});
            match resp.body {
                crate::server::RespBody::Json(v) => {
                    h.insert(
                        "Content-Type".into(),
                        json!("application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8"),
                    );
                    item["body"] = v;
                }
                crate::server::RespBody::Text(t, ct) => {
                    h.insert("Content-Type".into(), json!(ct));
                    item["body"] = json!(t);
                }
                _ => {}
            }
            item["headers"] = Value::Object(h);
            responses.push(item);
        }
        let shuffle = self.lock().cfg.shuffle_batch_responses;
        if shuffle {
            let mut st = self.lock();
            responses.shuffle(&mut st.rng);
        }
        SimResponse::json(200, json!({"responses": responses}))
    }
}
