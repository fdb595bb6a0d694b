//! Serde mirrors of the Graph JSON the client reads and writes (camelCase on the wire).
//!
//! Almost every read field is optional: delta pages carry updated messages as `id` plus the
//! changed properties only, and `$select` trims the rest.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{InternetMessageId, MicrosoftMessageId};

/// One page of a collection: `value` plus `@odata.nextLink` when more pages follow.
#[derive(Debug, Clone, Deserialize)]
pub struct Page<T> {
    #[serde(default = "Vec::new")]
    pub value: Vec<T>,
    #[serde(rename = "@odata.nextLink")]
    pub next_link: Option<String>,
}

/// `GET /me`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub display_name: Option<String>,
    /// Null for accounts without an Exchange mailbox address.
    pub mail: Option<String>,
    pub user_principal_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MailFolder {
    pub id: String,
    pub display_name: Option<String>,
    pub parent_folder_id: Option<String>,
    pub child_folder_count: Option<u32>,
    pub unread_item_count: Option<u32>,
    pub total_item_count: Option<u32>,
    pub is_hidden: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmailAddressBody {
    pub name: Option<String>,
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    pub email_address: EmailAddressBody,
}

impl Recipient {
    #[must_use]
    pub fn new(address: impl Into<String>, name: Option<String>) -> Self {
        Self {
            email_address: EmailAddressBody {
                name,
                address: Some(address.into()),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyType {
    Html,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemBody {
    pub content_type: BodyType,
    pub content: String,
}

impl ItemBody {
    #[must_use]
    pub fn html(content: impl Into<String>) -> Self {
        Self {
            content_type: BodyType::Html,
            content: content.into(),
        }
    }
    #[must_use]
    pub fn text(content: impl Into<String>) -> Self {
        Self {
            content_type: BodyType::Text,
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternetMessageHeader {
    pub name: String,
    pub value: String,
}

/// A Graph message. All fields but `id` may be absent (partial delta updates, `$select`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: MicrosoftMessageId,
    /// Raw value: some mailers emit junk ids, so parsing is left to [`Message::internet_message_id`].
    #[serde(rename = "internetMessageId")]
    pub internet_message_id_raw: Option<String>,
    pub conversation_id: Option<String>,
    pub conversation_index: Option<String>,
    pub subject: Option<String>,
    pub body_preview: Option<String>,
    pub body: Option<ItemBody>,
    pub from: Option<Recipient>,
    pub sender: Option<Recipient>,
    pub to_recipients: Option<Vec<Recipient>>,
    pub cc_recipients: Option<Vec<Recipient>>,
    pub bcc_recipients: Option<Vec<Recipient>>,
    pub reply_to: Option<Vec<Recipient>>,
    pub received_date_time: Option<DateTime<Utc>>,
    pub sent_date_time: Option<DateTime<Utc>>,
    pub created_date_time: Option<DateTime<Utc>>,
    pub last_modified_date_time: Option<DateTime<Utc>>,
    pub has_attachments: Option<bool>,
    pub is_read: Option<bool>,
    pub is_draft: Option<bool>,
    pub parent_folder_id: Option<String>,
    pub change_key: Option<String>,
    #[serde(rename = "@odata.etag")]
    pub etag: Option<String>,
    /// Present only when selected, and only on mail that came from the internet.
    pub internet_message_headers: Option<Vec<InternetMessageHeader>>,
}

impl Message {
    /// The parsed `internetMessageId`; `None` when absent or junk.
    #[must_use]
    pub fn internet_message_id(&self) -> Option<InternetMessageId> {
        self.internet_message_id_raw
            .as_deref()
            .and_then(|raw| InternetMessageId::parse(raw).ok())
    }

    /// The first header with this name (case-insensitive), e.g. `In-Reply-To`, `References`.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.internet_message_headers
            .as_deref()?
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
}

/// Attachment metadata (no content bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentInfo {
    /// `#microsoft.graph.fileAttachment`, `itemAttachment` or `referenceAttachment`.
    #[serde(rename = "@odata.type")]
    pub odata_type: Option<String>,
    pub id: String,
    pub name: Option<String>,
    pub content_type: Option<String>,
    pub size: Option<u64>,
    pub is_inline: Option<bool>,
    /// Only file attachments have it; fetch the attachment itself when it is needed.
    pub content_id: Option<String>,
}

/// Body of `createReply`: a plain comment OR a full message, never both (Graph answers 400).
#[derive(Debug, Clone)]
pub enum ReplyContent {
    Comment(String),
    Message(MessagePatch),
}

/// Writable message fields for drafts (`createReply` with `message`, `PATCH`, `sendMail`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagePatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<ItemBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_recipients: Option<Vec<Recipient>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cc_recipients: Option<Vec<Recipient>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bcc_recipients: Option<Vec<Recipient>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Vec<Recipient>>,
    /// Graph accepts only `X-` names here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internet_message_headers: Option<Vec<InternetMessageHeader>>,
}

/// A file attachment to send inline with `sendMail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileAttachment {
    #[serde(rename = "@odata.type")]
    pub odata_type: String,
    pub name: String,
    pub content_type: String,
    /// Base64.
    pub content_bytes: String,
    #[serde(default)]
    pub is_inline: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
}

impl FileAttachment {
    #[must_use]
    pub fn new(name: String, content_type: String, content_bytes_base64: String) -> Self {
        Self {
            odata_type: "#microsoft.graph.fileAttachment".into(),
            name,
            content_type,
            content_bytes: content_bytes_base64,
            is_inline: false,
            content_id: None,
        }
    }
}

/// The `message` of `POST /sendMail`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutgoingMessage {
    #[serde(flatten)]
    pub fields: MessagePatch,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<FileAttachment>,
}

/// One change in a delta page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaChange {
    /// Created (whole message) or updated (`id` + changed properties only).
    Upsert(Message),
    /// `@removed`: deleted, or moved out of the folder (`reason = "changed"`).
    Removed {
        id: MicrosoftMessageId,
        reason: String,
    },
}

/// How a delta page continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaNext {
    /// More pages of this round: follow verbatim.
    NextLink(String),
    /// The round is complete: store verbatim and start the next round from it.
    DeltaLink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPage {
    pub changes: Vec<DeltaChange>,
    pub next: DeltaNext,
}

#[derive(Deserialize)]
pub(crate) struct RawDeltaPage {
    #[serde(default)]
    pub value: Vec<RawDeltaItem>,
    #[serde(rename = "@odata.nextLink")]
    pub next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    pub delta_link: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct RawDeltaItem {
    #[serde(rename = "@removed")]
    pub removed: Option<RemovedMarker>,
    #[serde(flatten)]
    pub message: Message,
}

#[derive(Deserialize)]
pub(crate) struct RemovedMarker {
    pub reason: Option<String>,
}

/// A change-notification subscription (`/subscriptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: String,
    pub resource: Option<String>,
    pub change_type: Option<String>,
    pub client_state: Option<String>,
    pub notification_url: Option<String>,
    pub lifecycle_notification_url: Option<String>,
    pub expiration_date_time: DateTime<Utc>,
}

/// Body of `POST /subscriptions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSubscription {
    /// `created` or `created,updated`.
    pub change_type: String,
    pub notification_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle_notification_url: Option<String>,
    /// e.g. `me/mailFolders('Inbox')/messages`.
    pub resource: String,
    pub expiration_date_time: DateTime<Utc>,
    /// At most 128 characters; echoed in every notification.
    pub client_state: String,
}

/// Result of probing a (shared) mailbox address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxProbe {
    /// The signed-in user can open the mailbox; its inbox.
    Accessible(MailFolder),
    /// 403 ErrorAccessDenied: the mailbox exists but the user has no rights on it.
    NoAccess,
    /// MailboxNotEnabledForRESTAPI or unknown user: there is no cloud mailbox at that address.
    NoMailbox,
}
