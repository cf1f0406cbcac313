-- Ingest's PostgreSQL schema, version 1: the same contract as the sled store
-- (ingest-svc/src/store.rs), enforced by the database so that any number of ingest replicas can
-- write concurrently. Text columns use the "C" collation so that orderings are byte orderings,
-- as in sled.

-- btree_gist lets one exclusion constraint combine equality on the key with range overlap on
-- the slots. It is a trusted extension (PostgreSQL 13+): the database owner may create it.
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- One row per stored reading batch. A linear-track batch covers slots [first_slot, end_slot)
-- of its UTC day under (epoch, channel); a tfhe-track batch covers the whole day with epoch 0
-- and channel 0. The exclusion constraint is the rule "a slot is encrypted once, ever": no two
-- rows of one (meter, day, track, epoch, channel) may overlap, whichever replica writes them.
CREATE TABLE batches (
    meter_id   text COLLATE "C" NOT NULL,
    day        date     NOT NULL,
    track      smallint NOT NULL,
    epoch      bigint   NOT NULL,
    channel    smallint NOT NULL,
    first_slot integer  NOT NULL,
    end_slot   integer  NOT NULL,
    -- The protobuf ReadingBatch as stored (ciphertexts included).
    body       bytea    NOT NULL,
    PRIMARY KEY (meter_id, day, track, epoch, channel, first_slot),
    CONSTRAINT batches_slots_valid CHECK (0 <= first_slot AND first_slot < end_slot),
    CONSTRAINT batches_slots_encrypted_once EXCLUDE USING gist (
        meter_id WITH =, day WITH =, track WITH =, epoch WITH =, channel WITH =,
        int4range(first_slot, end_slot) WITH &&)
);

-- Every meter with stored readings (Ingest lists them without scanning the batches).
CREATE TABLE meters (
    meter_id text COLLATE "C" PRIMARY KEY
);

-- Linear-track key enrollments, numbered in commit order: writers take a transaction-level
-- advisory lock before numbering, so a keyshare that has read up to seq N never misses a
-- smaller number committed later.
CREATE TABLE enrollments (
    seq      bigint PRIMARY KEY CHECK (seq > 0),
    meter_id text COLLATE "C" NOT NULL,
    epoch    bigint NOT NULL,
    -- The protobuf Enrollment with seq 0.
    body     bytea  NOT NULL,
    UNIQUE (meter_id, epoch)
);
