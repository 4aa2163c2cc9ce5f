//! A simulated network that drops, duplicates and reorders sealed envelopes,
//! driving a help-seeker and a supporter with two devices (plus the supporter's
//! device-to-device sync session) through thousands of messages.

use std::collections::{BTreeMap, BTreeSet};

use haven_protocol::{
    Device, IdentityKey, IdentityKeyPair, MessageError, MessageKind, Session, open, seal,
};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use super::device_with_bundle;

/// Who is who in the simulation.
const HELP_SEEKER: usize = 0;
const DEVICES: [usize; 2] = [1, 2];

struct Packet {
    to: usize,
    message: u64,
    sealed: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Faults {
    drop_percent: u32,
    duplicate_percent: u32,
    /// A packet is taken from among the oldest `reorder_window` in flight.
    reorder_window: usize,
}

enum Keys {
    /// The help-seeker: a throwaway identity, no prekeys.
    Person(Box<IdentityKeyPair>),
    /// A supporter device, which accepts new sessions.
    Device(Box<Device>),
}

struct Party {
    keys: Keys,
    /// Sessions by remote identity.
    sessions: BTreeMap<[u8; 128], Session>,
}

struct Sim {
    rng: ChaCha20Rng,
    parties: Vec<Party>,
    in_flight: Vec<Packet>,
    faults: Faults,
    next_message: u64,
    /// (recipient, message) pairs sent, and how many copies reached the wire.
    sent: BTreeMap<(usize, u64), u32>,
    delivered: BTreeSet<(usize, u64)>,
    duplicates_refused: u64,
}

fn identity_of(parties: &[Party], party: usize) -> &IdentityKeyPair {
    match &parties[party].keys {
        Keys::Device(device) => device.identity(),
        Keys::Person(identity) => identity,
    }
}

fn key(identity: &IdentityKey) -> [u8; 128] {
    identity.to_bytes()
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let help_seeker = IdentityKeyPair::generate(&mut rng);
        let (device_a, bundle_a) = device_with_bundle(&mut rng);
        let (device_b, bundle_b) = device_with_bundle(&mut rng);
        let mut sessions = BTreeMap::new();
        for bundle in [&bundle_a, &bundle_b] {
            let session = Session::initiate(&help_seeker, bundle, &mut rng).unwrap();
            sessions.insert(key(bundle.identity()), session);
        }
        // Device A starts the supporter's own sync session with device B.
        let sync_bundle = device_b
            .bundle(
                Some(device_b.one_time_prekey_ids()[1]),
                Some(device_b.kem_one_time_prekey_ids()[1]),
            )
            .unwrap();
        let sync = Session::initiate(device_a.identity(), &sync_bundle, &mut rng).unwrap();
        let parties = vec![
            Party {
                keys: Keys::Person(Box::new(help_seeker)),
                sessions,
            },
            Party {
                keys: Keys::Device(Box::new(device_a)),
                sessions: BTreeMap::from([(key(sync_bundle.identity()), sync)]),
            },
            Party {
                keys: Keys::Device(Box::new(device_b)),
                sessions: BTreeMap::new(),
            },
        ];
        Self {
            rng,
            parties,
            in_flight: Vec::new(),
            faults,
            next_message: 0,
            sent: BTreeMap::new(),
            delivered: BTreeSet::new(),
            duplicates_refused: 0,
        }
    }

    fn identity_of(&self, party: usize) -> &IdentityKeyPair {
        identity_of(&self.parties, party)
    }

    fn has_session(&self, from: usize, to: usize) -> bool {
        self.parties[from]
            .sessions
            .contains_key(&key(self.identity_of(to).public()))
    }

    /// Encrypts one logical message from `from` to `to` and puts it on the wire.
    fn send(&mut self, from: usize, to: usize) {
        let message = self.next_message;
        self.next_message += 1;
        let remote = key(self.identity_of(to).public());
        let recipient = *self.identity_of(to).public();
        let plaintext = format!("message {message} from {from} to {to}").into_bytes();
        let session = self.parties[from]
            .sessions
            .get_mut(&remote)
            .expect("session to recipient");
        let content = session.encrypt(&plaintext, &mut self.rng).unwrap();
        let sealed = seal(
            identity_of(&self.parties, from),
            &recipient,
            &content,
            &mut self.rng,
        )
        .unwrap();
        let copies = if self.rng.next_u32() % 100 < self.faults.duplicate_percent {
            2
        } else {
            1
        };
        let mut on_wire = 0;
        for _ in 0..copies {
            if self.rng.next_u32() % 100 < self.faults.drop_percent {
                continue;
            }
            on_wire += 1;
            self.in_flight.push(Packet {
                to,
                message,
                sealed: sealed.clone(),
            });
        }
        self.sent.insert((to, message), on_wire);
    }

    /// Delivers one packet, chosen among the oldest few.
    fn deliver_one(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let window = self.faults.reorder_window.clamp(1, self.in_flight.len());
        let index = (self.rng.next_u32() as usize) % window;
        let packet = self.in_flight.remove(index);
        let to = packet.to;
        let (sender, content) = open(self.identity_of(to), &packet.sealed).unwrap();
        let kind = MessageKind::of(&content).unwrap();
        let party = &mut self.parties[to];
        let result = match party.sessions.get_mut(&key(&sender)) {
            Some(session) => session.decrypt(&content, &mut self.rng),
            None => {
                assert_eq!(
                    kind,
                    MessageKind::Initial,
                    "a session starts with an initial message"
                );
                let Keys::Device(device) = &mut party.keys else {
                    panic!("only devices accept new sessions");
                };
                let (session, plaintext) = device.accept(&content, &mut self.rng).unwrap();
                party.sessions.insert(key(&sender), session);
                Ok(plaintext)
            }
        };
        match result {
            Ok(plaintext) => {
                let expected = format!("message {} from", packet.message);
                assert!(String::from_utf8_lossy(&plaintext).starts_with(&expected));
                assert!(
                    self.delivered.insert((to, packet.message)),
                    "decrypted twice"
                );
            }
            Err(MessageError::Duplicate) => {
                assert!(
                    self.delivered.contains(&(to, packet.message)),
                    "refused as duplicate but never delivered"
                );
                self.duplicates_refused += 1;
            }
            Err(other) => panic!("message {} to {to}: {other}", packet.message),
        }
    }

    /// One step of the conversation: someone writes, or the network delivers.
    fn step(&mut self) {
        match self.rng.next_u32() % 10 {
            0..=2 => {
                for device in DEVICES {
                    self.send(HELP_SEEKER, device);
                }
            }
            3 | 4 => {
                let device = DEVICES[(self.rng.next_u32() % 2) as usize];
                let other = if device == DEVICES[0] {
                    DEVICES[1]
                } else {
                    DEVICES[0]
                };
                if self.has_session(device, HELP_SEEKER) {
                    // A reply goes to the help-seeker, and a sync copy to the other device.
                    self.send(device, HELP_SEEKER);
                    if self.has_session(device, other) {
                        self.send(device, other);
                    }
                }
            }
            _ => self.deliver_one(),
        }
    }

    fn run(mut self, steps: usize) -> Self {
        for _ in 0..steps {
            self.step();
        }
        while !self.in_flight.is_empty() {
            self.deliver_one();
        }
        // Everything that reached the wire decrypted exactly once.
        for ((to, message), copies) in &self.sent {
            assert_eq!(
                self.delivered.contains(&(*to, *message)),
                *copies > 0,
                "message {message} to {to} ({copies} copies on the wire)"
            );
        }
        self
    }
}

#[test]
fn thousands_of_messages_through_a_lossy_reordering_duplicating_network() {
    let faults = Faults {
        drop_percent: 5,
        duplicate_percent: 5,
        reorder_window: 8,
    };
    let sim = Sim::new(1, faults).run(6000);
    assert!(
        sim.delivered.len() > 3000,
        "only {} delivered",
        sim.delivered.len()
    );
    assert!(sim.duplicates_refused > 50);
    // Both supporter devices hold a session with the help-seeker, and with each other.
    for device in DEVICES {
        assert_eq!(sim.parties[device].sessions.len(), 2);
    }
}

#[test]
fn a_perfect_network_delivers_everything_in_order() {
    let faults = Faults {
        drop_percent: 0,
        duplicate_percent: 0,
        reorder_window: 1,
    };
    let sim = Sim::new(2, faults).run(2000);
    assert_eq!(sim.delivered.len(), sim.sent.len());
    assert_eq!(sim.duplicates_refused, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_schedules_deliver_exactly_once(
        seed in any::<u64>(),
        drop_percent in 0u32..30,
        duplicate_percent in 0u32..30,
        reorder_window in 1usize..40,
    ) {
        let faults = Faults { drop_percent, duplicate_percent, reorder_window };
        Sim::new(seed, faults).run(300);
    }
}
