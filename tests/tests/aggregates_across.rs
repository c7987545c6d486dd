//! Decisions across several aggregate instances against real servers: one
//! atomic batch that guards every instance (one it only reads too), a
//! refusal that appends nothing anywhere, clear errors for what cannot be
//! guarded, and transfers racing on a 3-node R3 cluster that never lose or
//! make money.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use choreo::{
    Aggregate, AggregateErrorKind, AggregateEvent, Aggregates, DecideError, Publisher,
    StreamSettings, event,
};
use choreo_testkit::{NatsCluster, NatsServer};

#[event(subject = "account.{account}.opened")]
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub account: String,
    pub balance: i64,
}

#[event(subject = "account.{account}.debited")]
#[derive(Debug, Clone, PartialEq)]
pub struct Debited {
    pub account: String,
    pub transfer: String,
    pub amount: i64,
}

#[event(subject = "account.{account}.credited")]
#[derive(Debug, Clone, PartialEq)]
pub struct Credited {
    pub account: String,
    pub transfer: String,
    pub amount: i64,
}

#[event(subject = "account.{account}.frozen")]
#[derive(Debug, Clone, PartialEq)]
pub struct Frozen {
    pub account: String,
}

#[derive(AggregateEvent, Debug, Clone, PartialEq)]
pub enum AccountEvent {
    Opened(Opened),
    Debited(Debited),
    Credited(Credited),
    Frozen(Frozen),
}

#[derive(Default, Clone, Debug)]
pub struct Account {
    pub balance: i64,
    pub frozen: bool,
}

impl Aggregate for Account {
    const NAME: &'static str = "Account";
    type Event = AccountEvent;
    fn filter(id: &str) -> String {
        format!("account.{id}.*")
    }
    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened(e) => self.balance = e.balance,
            AccountEvent::Debited(e) => self.balance -= e.amount,
            AccountEvent::Credited(e) => self.balance += e.amount,
            AccountEvent::Frozen(_) => self.frozen = true,
        }
    }
}

/// An aggregate in another stream, to show a decision cannot span two.
#[event(subject = "ledger.{book}.noted")]
#[derive(Debug, Clone, PartialEq)]
pub struct Noted {
    pub book: String,
}

#[derive(AggregateEvent)]
pub enum LedgerEvent {
    Noted(Noted),
}

#[derive(Default, Clone, Debug)]
pub struct Ledger;

impl Aggregate for Ledger {
    const NAME: &'static str = "Ledger";
    type Event = LedgerEvent;
    fn filter(id: &str) -> String {
        format!("ledger.{id}.*")
    }
    fn apply(&mut self, _: &LedgerEvent) {}
}

fn debit(account: &str, transfer: &str, amount: i64) -> AccountEvent {
    AccountEvent::Debited(Debited {
        account: account.into(),
        transfer: transfer.into(),
        amount,
    })
}

fn credit(account: &str, transfer: &str, amount: i64) -> AccountEvent {
    AccountEvent::Credited(Credited {
        account: account.into(),
        transfer: transfer.into(),
        amount,
    })
}

async fn open(bank: &Aggregates, id: &str, balance: i64) {
    bank.decide::<Account, _, String>(id, |_| {
        Ok(vec![AccountEvent::Opened(Opened {
            account: id.into(),
            balance,
        })])
    })
    .await
    .unwrap();
}

/// Moves `amount` from `from` to `to` if `from` has it.
async fn transfer(
    bank: &Aggregates,
    (from, to): (&str, &str),
    transfer: &str,
    amount: i64,
) -> Result<choreo::Decided<(Account, Account)>, DecideError<String>> {
    bank.decide_across::<(Account, Account), _, _>(&[from, to], |(a, _)| {
        if a.balance < amount {
            return Err(format!("{from} has {}, not {amount}", a.balance));
        }
        Ok((
            vec![debit(from, transfer, amount)],
            vec![credit(to, transfer, amount)],
        ))
    })
    .await
}

fn bank(client: &choreo::async_nats::Client) -> Aggregates {
    Aggregates::new(Publisher::new(client.clone(), "bank").unwrap())
}

#[tokio::test]
async fn a_transfer_is_one_batch_on_both_accounts_or_nothing() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let bank = bank(&client);
    open(&bank, "alice", 100).await;
    open(&bank, "bob", 10).await;

    let done = transfer(&bank, ("alice", "bob"), "t1", 30).await.unwrap();
    let (alice, bob) = &done.state;
    assert_eq!((alice.balance, bob.balance), (70, 40));
    let seqs: Vec<u64> = done.appended.iter().map(|a| a.sequence).collect();
    assert_eq!(seqs, vec![3, 4], "one batch, in the order returned");
    assert_eq!(done.appended[0].subject, "account.alice.debited");
    assert_eq!(done.appended[1].subject, "account.bob.credited");
    assert_eq!(done.version, 4);

    // A refusal appends nothing on either account.
    let refused = transfer(&bank, ("bob", "alice"), "t2", 500).await;
    assert!(
        matches!(&refused, Err(DecideError::Refused(why)) if why.contains("bob has 40")),
        "{refused:?}"
    );
    let fresh = Aggregates::new(Publisher::new(client.clone(), "reader").unwrap());
    assert_eq!(fresh.load::<Account>("alice").await.unwrap().version, 3);
    assert_eq!(fresh.load::<Account>("bob").await.unwrap().version, 4);

    // A Vec of one aggregate type: any number of instances, each event
    // going to the instance whose subjects it is on.
    open(&bank, "carol", 0).await;
    let split = bank
        .decide_across::<Vec<Account>, _, String>(&["alice", "bob", "carol"], |accounts| {
            let half = accounts[0].balance / 2;
            Ok(vec![
                credit("carol", "t3", half),
                debit("alice", "t3", half),
                credit("bob", "t3", 0),
            ])
        })
        .await
        .unwrap();
    let balances: Vec<i64> = split.state.iter().map(|a| a.balance).collect();
    assert_eq!(balances, vec![35, 40, 35]);
    let subjects: Vec<&str> = split.appended.iter().map(|a| a.subject.as_str()).collect();
    assert_eq!(
        subjects,
        vec![
            "account.alice.debited",
            "account.bob.credited",
            "account.carol.credited"
        ],
        "stored grouped by instance, in the order of the ids"
    );
    let alice = fresh.load::<Account>("alice").await.unwrap();
    assert_eq!(alice.state.balance, 35);
}

#[tokio::test]
async fn an_instance_the_decision_only_reads_is_guarded_too() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let bank = bank(&client);
    open(&bank, "alice", 100).await;
    open(&bank, "bob", 0).await;
    open(&bank, "guarantor", 0).await;
    let url = server.url();

    // A transfer with a fee, allowed while the guarantor is not frozen: it
    // writes three events to two accounts and reads a third. While the
    // first attempt decides, another process freezes the guarantor.
    let attempts = AtomicU32::new(0);
    let result = bank
        .decide_across::<(Account, Account, Account), _, _>(
            &["alice", "bob", "guarantor"],
            |(a, _, g)| {
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    freeze_elsewhere(&url, "guarantor");
                }
                if g.frozen {
                    return Err("the guarantor is frozen".to_owned());
                }
                if a.balance < 11 {
                    return Err("not enough".to_owned());
                }
                Ok((
                    vec![debit("alice", "t1", 10), debit("alice", "t1-fee", 1)],
                    vec![credit("bob", "t1", 10)],
                    vec![],
                ))
            },
        )
        .await;
    assert!(
        matches!(&result, Err(DecideError::Refused(why)) if why.contains("frozen")),
        "the guarantor's check failed the first append, and the second decision saw it frozen: {result:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let alice = bank.load::<Account>("alice").await.unwrap();
    assert_eq!(
        (alice.state.balance, alice.events),
        (100, 1),
        "nothing appended"
    );

    // Fewer events than instances: one instance would go unguarded.
    let err = bank
        .decide_across::<(Account, Account, Account), _, String>(&["alice", "bob", "carol"], |_| {
            Ok((
                vec![debit("alice", "t2", 1)],
                vec![credit("bob", "t2", 1)],
                vec![],
            ))
        })
        .await
        .unwrap_err();
    let DecideError::Failed(e) = &err else {
        panic!("{err}")
    };
    assert_eq!(e.kind(), AggregateErrorKind::Usage);
    assert!(
        e.to_string()
            .contains("appends 2 events, fewer than the 3 instances"),
        "{e}"
    );
}

/// Freezes `account` from another connection, on another thread and
/// runtime, and returns when it is stored: a writer in another process.
fn freeze_elsewhere(url: &str, account: &str) {
    let (url, account) = (url.to_owned(), account.to_owned());
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let client = choreo::async_nats::connect(url).await.unwrap();
            bank(&client)
                .decide::<Account, _, String>(&account, |_| {
                    Ok(vec![AccountEvent::Frozen(Frozen {
                        account: account.clone(),
                    })])
                })
                .await
                .unwrap();
        });
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn what_cannot_be_one_guarded_batch_is_a_clear_error() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let bank = bank(&client);
    open(&bank, "alice", 100).await;

    let usage = |err: DecideError<String>| match err {
        DecideError::Failed(e) => (e.kind(), e.to_string()),
        other => panic!("{other}"),
    };
    let (kind, text) = usage(
        transfer(&bank, ("alice", "alice"), "t1", 1)
            .await
            .unwrap_err(),
    );
    assert_eq!(kind, AggregateErrorKind::Usage);
    assert!(text.contains("Account alice: named twice"), "{text}");

    let (kind, text) = usage(
        bank.decide_across::<(Account, Account), _, String>(&["alice"], |_| Ok((vec![], vec![])))
            .await
            .unwrap_err(),
    );
    assert_eq!(kind, AggregateErrorKind::Usage);
    assert!(
        text.contains("1 ids for a decision across 2 aggregates"),
        "{text}"
    );

    let (kind, text) = usage(
        bank.decide_across::<(Account, Ledger), _, String>(&["alice", "main"], |_| {
            Ok((vec![debit("alice", "x", 1)], vec![]))
        })
        .await
        .unwrap_err(),
    );
    assert_eq!(kind, AggregateErrorKind::Stream);
    assert!(
        text.contains("one atomic batch, which is one stream"),
        "{text}"
    );

    let (kind, text) = usage(
        bank.decide_across::<Vec<Account>, _, String>(&["alice"], |_| {
            Ok(vec![credit("zed", "t", 1)])
        })
        .await
        .unwrap_err(),
    );
    assert_eq!(kind, AggregateErrorKind::Append);
    assert!(
        text.contains("account.zed.credited is on none of the instances"),
        "{text}"
    );
    assert_eq!(bank.load::<Account>("alice").await.unwrap().events, 1);
}

/// Writers on the three nodes of an R3 cluster move money between four
/// accounts at once: every transfer is stored whole or not at all, no
/// account ever goes below zero, and the money in the bank stays the same.
#[tokio::test]
async fn racing_transfers_on_a_cluster_never_lose_or_make_money() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let client = cluster.connect().await.unwrap();
    Publisher::new(client.clone(), "setup")
        .unwrap()
        .stream_settings(StreamSettings::default().replicas(3))
        .ensure_stream::<Opened>()
        .await
        .unwrap();
    let mut banks = Vec::new();
    for i in 0..3 {
        banks.push(bank(&cluster.node(i).connect().await.unwrap()).attempts(50));
    }
    const ACCOUNTS: usize = 4;
    const START: i64 = 100;
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("acc{i}")).collect();
    for n in &names {
        open(&banks[0], n, START).await;
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for t in 0..300usize {
        let bank = banks[t % banks.len()].clone();
        let slots = slots.clone();
        let from = names[t % ACCOUNTS].clone();
        let to = names[(t * 7 + 1) % ACCOUNTS].clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.unwrap();
            if from == to {
                return None;
            }
            let amount = 1 + (t as i64 * 13) % 40;
            let id = format!("t{t}");
            match transfer(&bank, (&from, &to), &id, amount).await {
                Ok(_) => Some(id),
                Err(DecideError::Refused(_)) => None,
                Err(e) => panic!("{id}: {e}"),
            }
        }));
    }
    let mut done = HashSet::new();
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            done.insert(id);
        }
    }
    assert!(
        done.len() > 50,
        "only {} transfers went through",
        done.len()
    );

    // Walk every account's history in stream order.
    let mut events = Vec::new();
    for n in &names {
        events.extend(banks[1].history::<Account>(n, None).await.unwrap());
    }
    events.sort_by_key(|r| r.sequence);
    let mut balances: HashMap<String, i64> = HashMap::new();
    let mut legs: HashMap<String, (u32, u32)> = HashMap::new();
    for r in &events {
        let (account, e) = match &r.event {
            AccountEvent::Opened(e) => (&e.account, None),
            AccountEvent::Debited(e) => {
                legs.entry(e.transfer.clone()).or_default().0 += 1;
                (&e.account, Some(-e.amount))
            }
            AccountEvent::Credited(e) => {
                legs.entry(e.transfer.clone()).or_default().1 += 1;
                (&e.account, Some(e.amount))
            }
            AccountEvent::Frozen(_) => unreachable!(),
        };
        let b = balances.entry(account.clone()).or_insert(START);
        *b += e.unwrap_or(0);
        assert!(*b >= 0, "{account} below zero at #{}", r.sequence);
    }
    let total: i64 = balances.values().sum();
    assert_eq!(total, START * ACCOUNTS as i64, "money made or lost");
    assert_eq!(
        legs.len(),
        done.len(),
        "every transfer that succeeded, and only those"
    );
    for (t, l) in &legs {
        assert_eq!(*l, (1, 1), "{t}: one debit and one credit");
        assert!(done.contains(t), "{t} stored but reported as not done");
    }
    // The folded states agree with the walk.
    for n in &names {
        let loaded = banks[2].load::<Account>(n).await.unwrap();
        assert_eq!(loaded.state.balance, balances[n], "{n}");
    }
}
