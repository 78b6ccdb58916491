-- validator.db as the unversioned ValidatorState (before PRAGMA user_version, commit 7802fe5)
-- wrote it: a scored round with weights, an unfinished one; tests/test_validator_state.py reads it
BEGIN TRANSACTION;
CREATE TABLE ema (hotkey TEXT PRIMARY KEY, value REAL NOT NULL, round_id INTEGER NOT NULL);
INSERT INTO "ema" VALUES('5Miner1',0.3,1);
CREATE TABLE eval_attempts (
        round_id INTEGER NOT NULL, model_hash TEXT NOT NULL, attempts INTEGER NOT NULL,
        PRIMARY KEY (round_id, model_hash));
INSERT INTO "eval_attempts" VALUES(1,'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm',1);
INSERT INTO "eval_attempts" VALUES(1,'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn',1);
CREATE TABLE results (
        round_id INTEGER NOT NULL, hotkey TEXT NOT NULL, model_hash TEXT NOT NULL, result TEXT NOT NULL,
        PRIMARY KEY (round_id, hotkey));
INSERT INTO "results" VALUES(1,'5Miner1','mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm','{"commit_block": 40, "items": [1, 2, 3]}');
CREATE TABLE rounds (
        id INTEGER PRIMARY KEY AUTOINCREMENT, sync_block INTEGER NOT NULL UNIQUE, block_hash TEXT NOT NULL,
        seed INTEGER NOT NULL, competition TEXT NOT NULL, phase TEXT NOT NULL,
        started REAL NOT NULL, finished REAL, leader TEXT, leader_hash TEXT, stack TEXT);
INSERT INTO "rounds" VALUES(1,100,'0xabababababababababababababababababababababababababababababababab',12345,'cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc','done',1.79631543064502143857e+09,1.79631543069286918638e+09,'5Miner1','mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm','{"mismatch": false, "torch": "2.13.0"}');
INSERT INTO "rounds" VALUES(2,200,'0xcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd',678,'cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc','evaluate',1.79631543070073103904e+09,NULL,NULL,NULL,NULL);
CREATE TABLE scores (
        round_id INTEGER NOT NULL, hotkey TEXT NOT NULL, uid INTEGER, model_hash TEXT NOT NULL,
        composite REAL NOT NULL, gate TEXT, rank INTEGER NOT NULL, axes TEXT NOT NULL,
        PRIMARY KEY (round_id, hotkey));
INSERT INTO "scores" VALUES(1,'5Miner1',1,'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm',0.75,NULL,1,'{"kl": 0.5}');
CREATE TABLE submissions (
        hotkey TEXT NOT NULL, commitment TEXT NOT NULL, model_hash TEXT, commit_block INTEGER NOT NULL,
        status TEXT NOT NULL, stage TEXT, reason TEXT, path TEXT, round_id INTEGER NOT NULL,
        PRIMARY KEY (hotkey, commitment));
INSERT INTO "submissions" VALUES('5Miner1','q2:local:m1:tok1:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm',40,'accepted',NULL,NULL,'/sub/m1',1);
INSERT INTO "submissions" VALUES('5Miner2','q2:bad',NULL,41,'rejected','fetch','manifest missing',NULL,1);
INSERT INTO "submissions" VALUES('5Miner3','q2:local:m3:tok3:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn',42,'rejected','evaluate','timed out','/sub/m3',1);
CREATE TABLE weights (
        round_id INTEGER PRIMARY KEY, block INTEGER NOT NULL, weights TEXT NOT NULL, accepted INTEGER NOT NULL);
INSERT INTO "weights" VALUES(1,101,'{"1": 1.0}',1);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('rounds',2);
COMMIT;
