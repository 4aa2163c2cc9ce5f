//! `haven`: the command line for the association (keys, signing supporters),
//! supporters (identity, devices, capacity) and help-seekers, and `haven chat`,
//! a terminal conversation — enough to try Haven by hand (README, "Try it").

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use ed25519_dalek::SigningKey;
use haven_proto::directory::{DocumentKind, sign, supporter_link};
use haven_proto::v1 as proto;
use haven_sdk::{Author, Client, Config, ConversationId, DirectoryFilter, Event};
use prost::Message as _;
use tokio::io::AsyncBufReadExt as _;

#[derive(Parser)]
#[command(name = "haven", version, about = "Haven from the command line.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The association: its signing key, and signing or revoking supporters.
    #[command(subcommand)]
    Association(AssociationCommand),
    /// A supporter's device: identity, registration, linking, capacity.
    #[command(subcommand)]
    Supporter(SupporterCommand),
    /// A help-seeker: browse the directory and contact a supporter.
    #[command(subcommand)]
    Seek(SeekCommand),
    /// Fetch what is waiting once and print it (what an app does when woken).
    Sync(Common),
    /// A terminal conversation: type to send, `/end` ends it, Ctrl-D leaves.
    Chat {
        #[command(flatten)]
        common: Common,
        /// The conversation (hex, from `haven seek contact` or `haven sync`); by
        /// default the only one on this device.
        #[arg(long)]
        conversation: Option<String>,
    },
}

/// What every client command needs.
#[derive(Args, Clone)]
struct Common {
    /// This device's data directory. Its storage key is kept beside it in
    /// `storage.key`: fine for trying Haven, not for real use (apps keep it in
    /// the platform keystore).
    #[arg(long, default_value = "./haven-client")]
    data: PathBuf,
    /// The relay.
    #[arg(long, env = "HAVEN_RELAY", default_value = "http://127.0.0.1:50051")]
    relay: String,
    /// The association's public key (64 hex digits), pinned.
    #[arg(long, env = "HAVEN_ASSOCIATION_KEY")]
    association_key: String,
    /// Reach the relay through a SOCKS5 proxy, e.g. Tor's `socks5h://127.0.0.1:9050`.
    #[arg(long, env = "HAVEN_PROXY")]
    proxy: Option<String>,
}

#[derive(Subcommand)]
enum AssociationCommand {
    /// Creates the association's signing key in FILE and prints its public key.
    Init {
        /// Where to write the secret key (created with mode 0600; keep it offline).
        #[arg(long)]
        key: PathBuf,
    },
    /// Signs a supporter's entry, publishes it on the relay, and prints the
    /// shareable link.
    SignSupporter {
        /// The association's key file.
        #[arg(long)]
        key: PathBuf,
        /// The supporter's key (hex, from `haven supporter init`).
        #[arg(long)]
        supporter_key: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Medical specialty.
        #[arg(long, default_value = "")]
        specialty: String,
        /// County.
        #[arg(long, default_value = "")]
        county: String,
        /// Town.
        #[arg(long, default_value = "")]
        town: String,
        /// Languages, e.g. --language nb --language en.
        #[arg(long = "language")]
        languages: Vec<String>,
        /// Days the entry stays valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// The relay.
        #[arg(long, env = "HAVEN_RELAY", default_value = "http://127.0.0.1:50051")]
        relay: String,
    },
    /// Revokes a supporter.
    Revoke {
        /// The association's key file.
        #[arg(long)]
        key: PathBuf,
        /// The supporter's key (hex).
        #[arg(long)]
        supporter_key: String,
        /// The relay.
        #[arg(long, env = "HAVEN_RELAY", default_value = "http://127.0.0.1:50051")]
        relay: String,
    },
}

#[derive(Subcommand)]
enum SupporterCommand {
    /// Creates this device's supporter identity and prints its key for the association.
    Init(Common),
    /// Registers this device (after the association published the entry).
    Register(Common),
    /// Sets how many conversations you hold open at most (0 pauses new contacts).
    Capacity {
        #[command(flatten)]
        common: Common,
        /// The number of new conversations.
        capacity: u32,
    },
    /// On a new device: prints the code to approve on a device that holds the supporter key.
    LinkCode {
        #[command(flatten)]
        common: Common,
        /// The supporter key you are joining (hex, from your directory entry).
        #[arg(long)]
        supporter: String,
    },
    /// Approves a new device by its code.
    Approve {
        #[command(flatten)]
        common: Common,
        /// The code printed by `haven supporter link-code` on the new device.
        code: String,
    },
    /// Lists the devices in your signed device list (identities in hex).
    Devices(Common),
    /// Removes a lost or replaced device from your device list.
    RemoveDevice {
        #[command(flatten)]
        common: Common,
        /// The device's identity (hex), as `haven supporter devices` prints it.
        identity: String,
    },
}

#[derive(Subcommand)]
enum SeekCommand {
    /// Lists supporters, verified against the pinned association key.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this county.
        #[arg(long)]
        county: Option<String>,
        /// Only this specialty.
        #[arg(long)]
        specialty: Option<String>,
        /// Only this language.
        #[arg(long)]
        language: Option<String>,
    },
    /// Starts an anonymous conversation with a supporter (by key, or from a shared link).
    Contact {
        #[command(flatten)]
        common: Common,
        /// The supporter's key (hex) or a `haven:supporter:1:` link.
        #[arg(long)]
        supporter: String,
        /// The first message.
        message: String,
    },
}

fn key_bytes(hex_text: &str, what: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(hex_text.trim()).with_context(|| format!("{what} is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{what} must be 32 bytes (64 hex digits)"))
}

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(hex::encode(bytes).as_bytes())?;
    Ok(())
}

fn read_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(SigningKey::from_bytes(&key_bytes(&text, "the key file")?))
}

fn open(common: &Common) -> anyhow::Result<Client> {
    std::fs::create_dir_all(&common.data)?;
    let key_path = common.data.join("storage.key");
    if !key_path.exists() {
        write_secret(&key_path, &rand::random::<[u8; 32]>())?;
    }
    let storage_key = zeroize::Zeroizing::new(key_bytes(
        &std::fs::read_to_string(&key_path)?,
        "storage.key",
    )?);
    Ok(Client::open(Config {
        relay_url: common.relay.clone(),
        ca_certificate: None,
        association_key: key_bytes(&common.association_key, "--association-key")?,
        data_dir: common.data.clone(),
        storage_key,
        proxy: common.proxy.clone(),
    })?)
}

async fn directory(
    relay: &str,
) -> anyhow::Result<proto::directory_client::DirectoryClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(relay.to_owned())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the relay at {relay}"))?;
    Ok(proto::directory_client::DirectoryClient::new(channel))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn print_event(event: &Event) {
    match event {
        Event::ConversationStarted { conversation, text } => {
            println!("new conversation {}: {text}", hex::encode(conversation));
        }
        Event::MessageReceived { conversation, text } => {
            println!("[{}] them: {text}", short(conversation))
        }
        Event::SentFromOtherDevice { conversation, text } => {
            println!("[{}] you (other device): {text}", short(conversation));
        }
        Event::ConversationEnded { conversation } => {
            println!("[{}] the conversation was ended", short(conversation))
        }
        Event::RetentionChanged {
            conversation,
            seconds,
        } => println!(
            "[{}] messages now disappear after {seconds} s on both sides",
            short(conversation)
        ),
        Event::SafetyNumber {
            conversation,
            number,
        } => println!(
            "[{}] safety number (compare it with theirs out of band): {number}",
            short(conversation)
        ),
        Event::ConversationDeclined { conversation } => println!(
            "[{}] the supporter is not taking new conversations right now; choose another",
            short(conversation)
        ),
        Event::FirstContactDeclined => {
            println!(
                "someone wrote while you had no room; they were told to choose another supporter"
            )
        }
        Event::EnvelopeRefused {
            conversation,
            reason,
        } => match conversation {
            Some(conversation) => println!(
                "[{}] a message could not be read and was dropped: {reason}",
                short(conversation)
            ),
            None => println!("a message could not be read and was dropped: {reason}"),
        },
        Event::SendFailed {
            conversation,
            reason,
        } => println!(
            "[{}] a message you sent earlier was not delivered: {reason}",
            short(conversation)
        ),
        _ => {}
    }
}

fn short(id: &ConversationId) -> String {
    hex::encode(&id[..4])
}

async fn chat(common: &Common, conversation: Option<String>) -> anyhow::Result<()> {
    let client = open(common)?;
    // What is waiting lands in the history, which is shown below.
    client.sync_once().await?;
    let id: ConversationId = match conversation {
        Some(text) => hex::decode(text)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a conversation id is 32 hex digits"))?,
        None => match client.conversations()?.as_slice() {
            [only] => *only,
            [] => bail!(
                "no conversation on this device yet (haven seek contact, or wait for one with haven sync)"
            ),
            _ => bail!("several conversations: pick one with --conversation"),
        },
    };
    for entry in client.history(&id)? {
        let who = match entry.author {
            Author::Me => "you",
            Author::Them => "them",
            Author::MyOtherDevice => "you (other device)",
        };
        println!("{who}: {}", entry.text);
    }
    println!(
        "-- safety numbers: {} --",
        client.safety_numbers(&id)?.join(" | ")
    );
    println!("-- /retention SECONDS sets when messages disappear (both sides); /end ends it --");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                None => return Ok(()),
                Some(line) if line.trim() == "/end" => {
                    client.end_conversation(&id).await?;
                    println!("-- ended; nothing of it is left on this device --");
                    return Ok(());
                }
                Some(line) if line.trim().starts_with("/retention") => {
                    match line.trim()["/retention".len()..].trim().parse::<u64>() {
                        Ok(seconds) => {
                            client.set_retention(&id, seconds).await?;
                            println!("-- messages now disappear after {seconds} s on both sides --");
                        }
                        Err(_) => println!("-- usage: /retention SECONDS --"),
                    }
                }
                Some(line) if line.trim().is_empty() => {}
                Some(line) => client.send(&id, line.trim()).await?,
            },
            _ = ticker.tick() => {
                for event in client.sync_once().await? {
                    print_event(&event);
                    if matches!(event, Event::ConversationEnded { conversation } if conversation == id) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Association(AssociationCommand::Init { key }) => {
            let signing = SigningKey::from_bytes(&rand::random());
            write_secret(&key, &signing.to_bytes())?;
            println!("{}", hex::encode(signing.verifying_key().to_bytes()));
        }
        Command::Association(AssociationCommand::SignSupporter {
            key,
            supporter_key,
            name,
            specialty,
            county,
            town,
            languages,
            days,
            relay,
        }) => {
            let association = read_signing_key(&key)?;
            let entry = proto::SupporterEntry {
                supporter_key: key_bytes(&supporter_key, "--supporter-key")?.to_vec(),
                display_name: name,
                specialty,
                county,
                town,
                languages,
                valid_until: now() + days * 24 * 3600,
            };
            let document = sign(
                DocumentKind::SupporterEntry,
                entry.encode_to_vec(),
                &association,
            );
            directory(&relay)
                .await?
                .publish_entry(proto::PublishDocumentRequest {
                    document: Some(document.clone()),
                })
                .await?;
            println!("{}", supporter_link(&document));
        }
        Command::Association(AssociationCommand::Revoke {
            key,
            supporter_key,
            relay,
        }) => {
            let association = read_signing_key(&key)?;
            let revocation = proto::Revocation {
                supporter_key: key_bytes(&supporter_key, "--supporter-key")?.to_vec(),
                revoked_at: now(),
            };
            let document = sign(
                DocumentKind::Revocation,
                revocation.encode_to_vec(),
                &association,
            );
            directory(&relay)
                .await?
                .publish_revocation(proto::PublishDocumentRequest {
                    document: Some(document),
                })
                .await?;
            println!("revoked");
        }
        Command::Supporter(SupporterCommand::Init(common)) => {
            println!(
                "{}",
                hex::encode(open(&common)?.create_supporter_identity()?)
            );
        }
        Command::Supporter(SupporterCommand::Register(common)) => {
            open(&common)?.register_supporter_device().await?;
            println!("registered");
        }
        Command::Supporter(SupporterCommand::Capacity { common, capacity }) => {
            open(&common)?.set_capacity(capacity).await?;
            println!("holding at most {capacity} conversations open");
        }
        Command::Supporter(SupporterCommand::LinkCode { common, supporter }) => {
            let supporter: [u8; 32] = hex::decode(supporter.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("--supporter must be 64 hex digits")?;
            println!("{}", open(&common)?.device_link_code(&supporter).await?);
        }
        Command::Supporter(SupporterCommand::Approve { common, code }) => {
            open(&common)?.approve_device(&code).await?;
            println!("approved");
        }
        Command::Supporter(SupporterCommand::Devices(common)) => {
            let client = open(&common)?;
            let own = client.device_identity()?;
            for identity in client.supporter_devices()? {
                let marker = if Some(identity) == own {
                    " (this device)"
                } else {
                    ""
                };
                println!("{}{marker}", hex::encode(identity));
            }
        }
        Command::Supporter(SupporterCommand::RemoveDevice { common, identity }) => {
            let identity: [u8; haven_sdk::IDENTITY_KEY_LEN] = hex::decode(identity.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("the identity must be 256 hex digits")?;
            open(&common)?.remove_device(&identity).await?;
            println!("removed");
        }
        Command::Seek(SeekCommand::List {
            common,
            county,
            specialty,
            language,
        }) => {
            let filter = DirectoryFilter {
                county,
                specialty,
                language,
                taking_new_conversations_only: false,
            };
            for supporter in open(&common)?.list_supporters(&filter).await? {
                println!(
                    "{}  {} — {}, {} {} [{}]{}",
                    hex::encode(supporter.key()),
                    supporter.display_name(),
                    supporter.specialty(),
                    supporter.town(),
                    supporter.county(),
                    supporter.languages().join(", "),
                    if supporter.taking_new_conversations() {
                        ""
                    } else {
                        "  (not taking new conversations)"
                    }
                );
            }
        }
        Command::Seek(SeekCommand::Contact {
            common,
            supporter,
            message,
        }) => {
            let client = open(&common)?;
            let key = if supporter.contains("haven:supporter:") {
                client.supporter_from_link(&supporter)?.key()
            } else {
                key_bytes(&supporter, "--supporter")?
            };
            let listed = client.supporter(&key).await?;
            let id = client.start_conversation(&listed, &message).await?;
            println!("{}", hex::encode(id));
        }
        Command::Sync(common) => {
            for event in open(&common)?.sync_once().await? {
                print_event(&event);
            }
        }
        Command::Chat {
            common,
            conversation,
        } => chat(&common, conversation).await?,
    }
    Ok(())
}
